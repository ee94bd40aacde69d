"""Candidate refusal directions: difference in means of ``resid_pre`` (Arditi et al. 2024).

For every layer ``l`` and every position ``p`` (by default the post-instruction positions; any
:data:`workbench.vocab.Positions` present in every prompt) the candidate is

    r[l, p] = mean_{harmful} x_l[p] - mean_{benign} x_l[p]

with ``x_l = blocks.{l}.hook_resid_pre``. The means are a streaming reduction over activation shards
(``(row_slice, Float[Tensor, "rows pos d_model"])``, the cache store's ``iter_shards``), accumulated in
float64, so any number of prompts fits in memory.

Activations come from :mod:`workbench.store` (``get_or_compute``: content-addressed, reused across analyses);
:func:`compute_resid_pre` computes an in-memory entry with the same interface with ``run_with_cache``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..chat import post_instruction_positions, tokenize_chat
from ..errors import WorkbenchError
from ..models import model_device
from ..progress import progress
from ..store import get_or_compute
from ..vocab import Positions, check_layers, hook_name, normalize_positions, position_index, resolve_positions

Shard = tuple[slice, Tensor]


def resid_pre_name(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``."""
    return hook_name("resid_pre", layer)


def layer_of(hook_name: str) -> int:
    """``"blocks.7.hook_resid_pre"`` -> ``7``."""
    parts = hook_name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise WorkbenchError(f"hook name {hook_name!r} is not of the form 'blocks.{{layer}}.<hook>'")
    return int(parts[1])


# ------------------------------------------------------------------------------------------- sources
class MemoryEntry:
    """An in-memory activation entry with the cache store's interface.

    Attributes:
        hook_names: e.g. ``["blocks.0.hook_resid_pre", ...]``.
        positions: negative post-instruction positions, e.g. ``[-4, -3, -2, -1]``.
    """

    def __init__(self, acts: dict[str, Tensor], positions: Sequence[int], shard_rows: int = 256):
        self._acts = acts
        self.hook_names = list(acts)
        self.positions = list(positions)
        self._shard_rows = shard_rows
        first = next(iter(acts.values()))
        self.n_prompts = int(first.shape[0])

    def activations(self, hook_name: str) -> Tensor:
        """``Float[Tensor, "prompt pos d_model"]``."""
        if hook_name not in self._acts:
            raise WorkbenchError(f"hook {hook_name!r} is not in this entry; it has {self.hook_names}")
        return self._acts[hook_name]

    def iter_shards(self, hook_name: str) -> Iterator[Shard]:
        """Yield ``(row_slice, Float[Tensor, "rows pos d_model"])``."""
        x = self.activations(hook_name)
        for s in range(0, x.shape[0], self._shard_rows):
            rows = slice(s, min(s + self._shard_rows, x.shape[0]))
            yield rows, x[rows]

    def __len__(self) -> int:
        return self.n_prompts


@torch.no_grad()
def compute_resid_pre(
    model,
    prompts: Sequence[str],
    batch_size: int = 32,
    show_progress: bool = True,
    system: str | None = None,
    positions: Positions = "post_instruction",
) -> MemoryEntry:
    """``resid_pre`` of every layer at ``positions`` (default: the post-instruction ones), computed with
    ``run_with_cache``.

    Returns:
        A :class:`MemoryEntry`; each hook holds ``Float[Tensor, "prompt pos d_model"]`` (float32).
    """
    _check_prompts(prompts, "prompts")
    positions = candidate_positions(positions)
    positions, _ = resolve_positions(positions, len(post_instruction_positions(model.tokenizer, system)))
    cols = position_index(positions)
    names = [resid_pre_name(l) for l in range(int(model.cfg.n_layers))]
    wanted = set(names)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    device = model_device(model)
    starts = range(0, len(prompts), batch_size)
    for s in progress(starts, "resid_pre", show_progress, total=len(starts)):
        batch = tokenize_chat(model.tokenizer, list(prompts[s:s + batch_size]), system).to(device)
        _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                        names_filter=lambda n: n in wanted)
        for n in names:
            out[n].append(cache[n][:, cols].float().cpu())
        del cache
    return MemoryEntry({n: torch.cat(v) for n, v in out.items()}, positions)


def activation_entry(
    model,
    prompts: Sequence[str],
    store=None,
    batch_size: int = 32,
    show_progress: bool = True,
    positions: Positions = "post_instruction",
    layers: Sequence[int] | None = None,
):
    """``resid_pre`` of ``layers`` (default: every layer) at ``positions`` (default: the post-instruction ones) of
    ``prompts``, from the cache store (``workbench.store.get_or_compute``; ``store`` is passed through to it).
    """
    _check_prompts(prompts, "prompts")
    positions = candidate_positions(positions)
    layers = check_layers(layers, int(model.cfg.n_layers), sort=True)
    return get_or_compute(model, list(prompts), hooks=("resid_pre", layers), positions=positions,
                          dtype="float32", store=store, batch_size=batch_size, show_progress=show_progress)


def candidate_positions(positions: Positions) -> str | tuple:
    """:func:`workbench.vocab.normalize_positions`, refusing ``"all"``: a mean over left-padded positions would
    mix padding into the candidates."""
    p = normalize_positions(positions)
    if p == "all":
        raise WorkbenchError("candidate directions need positions present in every prompt, but positions='all' "
                             "includes the left padding; use 'post_instruction', 'last' or negative offsets")
    return p


def _check_prompts(prompts, what: str) -> None:
    if isinstance(prompts, str):
        raise WorkbenchError(f"{what} must be a list of strings, got a single string")
    if prompts is None or len(prompts) == 0:
        raise WorkbenchError(f"{what} is empty; pass at least one prompt")


# ----------------------------------------------------------------------------------- streaming means
def streaming_mean(shards: Iterable[Shard | Tensor]) -> tuple[Tensor, int]:
    """Mean over the rows of a stream of shards, accumulated in float64.

    Args:
        shards: ``(row_slice, Float[Tensor, "rows ..."])`` pairs or bare ``Float[Tensor, "rows ..."]``.

    Returns:
        ``(Float64[Tensor, "..."], n_rows)``.
    """
    total: Tensor | None = None
    n = 0
    for shard in shards:
        x = shard[1] if isinstance(shard, tuple) else shard
        s = x.detach().to(torch.float64).sum(0)
        total = s if total is None else total + s.to(total.device)
        n += int(x.shape[0])
    if total is None or n == 0:
        raise WorkbenchError("cannot take a mean over zero activations; the prompt set is empty")
    return total / n, n


@dataclass
class Candidates:
    """Difference-in-means candidates at every layer and post-instruction position.

    Attributes:
        directions: ``Float64[Tensor, "layer pos d_model"]`` harmful mean minus benign mean.
        harmful_mean, benign_mean: ``Float64[Tensor, "layer pos d_model"]``.
        layers: layer index of each row of ``directions``.
        positions: negative post-instruction position of each column, e.g. ``[-4, -3, -2, -1]``.
        n_harmful, n_benign: prompt counts.
    """

    directions: Tensor
    harmful_mean: Tensor
    benign_mean: Tensor
    layers: list[int]
    positions: list[int]
    n_harmful: int
    n_benign: int
    meta: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[-1])

    def index(self, layer: int, position: int) -> tuple[int, int]:
        """Row/column of ``(layer, position)`` in :attr:`directions`, with a clear error when absent."""
        if layer not in self.layers:
            raise WorkbenchError(f"layer {layer} is out of range; candidates exist for layers {self.layers}")
        if position not in self.positions:
            raise WorkbenchError(f"position {position} is out of range; candidates exist for positions {self.positions}")
        return self.layers.index(layer), self.positions.index(position)

    def vector(self, layer: int, position: int) -> Tensor:
        """``Float64[Tensor, "d_model"]`` the candidate at ``(layer, position)``."""
        i, j = self.index(layer, position)
        return self.directions[i, j]

    def flat(self) -> tuple[Tensor, list[tuple[int, int]]]:
        """``(Float64[Tensor, "cand d_model"], [(layer, position), ...])`` in layer-major order."""
        keys = [(l, p) for l in self.layers for p in self.positions]
        return self.directions.reshape(-1, self.d_model), keys


def diff_in_means(harmful, benign, hook_names: Sequence[str] | None = None) -> Candidates:
    """Difference in means of two activation entries (store entries or :class:`MemoryEntry`): the one
    implementation of the package (the patching analyses use it for clean minus corrupted too).

    Args:
        harmful, benign: objects with ``hook_names``, ``positions`` and ``iter_shards(hook)``; the result is
            ``mean(harmful) - mean(benign)`` (float64, streamed shard by shard).
        hook_names: which ``resid_pre`` hooks to use (default: every one in ``harmful``).

    Returns:
        :class:`Candidates` over the layers of ``hook_names`` and the entries' positions.
    """
    names = list(hook_names) if hook_names is not None else list(harmful.hook_names)
    if not names:
        raise WorkbenchError("no hooks to compute candidates from")
    for entry, what in ((harmful, "harmful"), (benign, "benign")):
        missing = [n for n in names if n not in entry.hook_names]
        if missing:
            raise WorkbenchError(f"the {what} activations lack hooks {missing}; they have {list(entry.hook_names)}")
    if list(harmful.positions) != list(benign.positions):
        raise WorkbenchError(
            f"harmful and benign activations cover different positions: {list(harmful.positions)} vs "
            f"{list(benign.positions)}"
        )
    hm, bm = [], []
    n_h = n_b = 0
    for name in names:
        m, n_h = streaming_mean(harmful.iter_shards(name))
        hm.append(m)
        m, n_b = streaming_mean(benign.iter_shards(name))
        bm.append(m)
    harmful_mean = torch.stack(hm)
    benign_mean = torch.stack(bm)
    if harmful_mean.shape != benign_mean.shape:
        raise WorkbenchError(f"activation shapes differ: {tuple(harmful_mean.shape)} vs {tuple(benign_mean.shape)}")
    return Candidates(
        directions=harmful_mean - benign_mean,
        harmful_mean=harmful_mean,
        benign_mean=benign_mean,
        layers=[layer_of(n) for n in names],
        positions=[int(p) for p in harmful.positions],
        n_harmful=n_h,
        n_benign=n_b,
    )


def candidate_directions(
    model,
    harmful: Sequence[str],
    benign: Sequence[str],
    store=None,
    batch_size: int = 32,
    show_progress: bool = True,
    positions: Positions = "post_instruction",
    layers: Sequence[int] | None = None,
) -> Candidates:
    """Difference-in-means candidates of ``model`` at ``layers`` (default: every layer) and each of ``positions``.

    Args:
        harmful, benign: prompt lists (train split).
        store: passed to the cache store (``None``: its default location).
        positions: :data:`workbench.vocab.Positions` present in every prompt (default: the post-instruction ones).

    Returns:
        :class:`Candidates` with ``directions`` of shape ``Float64[Tensor, "layer pos d_model"]``.
    """
    _check_prompts(harmful, "the harmful prompt set")
    _check_prompts(benign, "the harmless prompt set")
    positions = candidate_positions(positions)
    layers = check_layers(layers, int(model.cfg.n_layers), sort=True)
    kw = {"store": store, "batch_size": batch_size, "show_progress": show_progress, "positions": positions,
          "layers": layers}
    h = activation_entry(model, harmful, **kw)
    b = activation_entry(model, benign, **kw)
    names = [resid_pre_name(l) for l in layers]
    cands = diff_in_means(h, b, names)
    cands.meta["d_model"] = int(model.cfg.d_model)
    return cands
