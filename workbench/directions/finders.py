"""Other ways to find a refusal direction, over the same activation entries as the difference in means.

* :func:`pca_directions` -- first principal axis of the paired differences ``x_harmful[i] - x_benign[i]``
  (uncentred, as in representation engineering: the axis that explains most of the pairs' differences),
  sign-aligned with the mean difference.
* :func:`probe_directions` -- weight vector of an L2-regularised logistic-regression probe
  (harmful = 1, benign = 0), trained in torch with L-BFGS (on standardised activations; the weight is mapped back to raw units).
* :func:`embedding_centroid` -- the mean of the input-embedding rows of the tokens of the refusal phrases
  (:data:`workbench.judge.REFUSAL_PHRASES`). Not the official Guiding Giants direction, which subtracts the
  answer phrases' centroid from its own refusal phrases' and normalises
  (:func:`workbench.steering.official.official_direction`).

Each returns a :class:`~workbench.directions.Direction` (one vector per layer for the activation finders,
``vector`` of shape ``Float[Tensor, "n_layers d_model"]``; ``direction.at(l)`` is the direction of layer ``l``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..judge import REFUSAL_PHRASES
from ..progress import progress
from .artifact import Direction
from .candidates import layer_of, resid_pre_name


def _check_entry(entry, what: str, position: int | None) -> None:
    if position is not None and position not in list(entry.positions):
        raise WorkbenchError(f"position {position} is out of range; the {what} activations have {list(entry.positions)}")


def _acts(entry, hook: str, position: int | None) -> Tensor:
    """``Float[Tensor, "prompt d_model"]`` at ``position`` (or averaged over positions when ``None``)."""
    chunks = []
    pos = list(entry.positions)
    for _, x in entry.iter_shards(hook):
        x = x.float()
        chunks.append(x.mean(1) if position is None else x[:, pos.index(position)])
    if not chunks:
        raise WorkbenchError(f"no activations for {hook!r}; the prompt set is empty")
    return torch.cat(chunks)


def _layers(entry, layers: Iterable[int] | None) -> list[int]:
    have = [layer_of(n) for n in entry.hook_names]
    if layers is None:
        return have
    layers = list(layers)
    bad = [l for l in layers if l not in have]
    if bad:
        raise WorkbenchError(f"layers {bad} are out of range; activations exist for layers {have}")
    return layers


def _fp(model) -> tuple[str, int]:
    from ..models import fingerprint

    return fingerprint(model), int(model.cfg.d_model)


def pca_directions(
    model,
    harmful,
    benign,
    position: int | None = -1,
    layers: Iterable[int] | None = None,
    show_progress: bool = True,
) -> Direction:
    """First principal axis of paired differences per layer.

    Pairs are ``(harmful[i], benign[i])`` for ``i < min(n_harmful, n_benign)``.

    Args:
        harmful, benign: activation entries (``hook_names``, ``positions``, ``iter_shards``).
        position: post-instruction position (``None``: mean over positions).

    Returns:
        :class:`Direction` with ``vector`` ``Float[Tensor, "layer d_model"]`` (unit rows), method ``"pca"``,
        ``scores["explained"]`` the fraction of the differences' energy on the axis per layer.
    """
    _check_entry(harmful, "harmful", position)
    _check_entry(benign, "benign", position)
    layers = _layers(harmful, layers)
    vecs, explained = [], []
    for l in progress(layers, "pca", show_progress):
        h, b = _acts(harmful, resid_pre_name(l), position), _acts(benign, resid_pre_name(l), position)
        n = min(len(h), len(b))
        if n < 1:
            raise WorkbenchError("PCA of paired differences needs at least one harmful and one benign prompt")
        diff = (h[:n] - b[:n]).double()
        _, s, vh = torch.linalg.svd(diff, full_matrices=False)
        v = vh[0]
        if (diff.mean(0) @ v) < 0:
            v = -v
        vecs.append(v.float())
        explained.append(float(s[0] ** 2 / (s ** 2).sum()))
    fp, d = _fp(model)
    return Direction(torch.stack(vecs), None, position, "pca", fp, d, {"explained": explained}, {"layers": layers})


def logistic_probe(x: Tensor, y: Tensor, l2: float = 1e-3, steps: int = 100) -> tuple[Tensor, float]:
    """Fit ``p(y=1|x) = sigmoid(x . w + b)`` with L-BFGS on the mean log-loss plus ``l2 |w|^2``.

    Args:
        x: ``Float[Tensor, "n d"]``; y: ``Float[Tensor, "n"]`` in {0, 1}.

    Returns:
        ``(w Float[Tensor, "d"], b)`` in the units of ``x`` (x is standardised internally for conditioning).
    """
    x = x.double()
    y = y.double()
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_x = (w / sd).detach()
    b_x = float(b.detach() - (w.detach() * mu / sd).sum())
    return w_x, b_x


def probe_directions(
    model,
    harmful,
    benign,
    position: int | None = -1,
    layers: Iterable[int] | None = None,
    l2: float = 1e-3,
    show_progress: bool = True,
) -> Direction:
    """Logistic-regression probe (harmful vs benign) per layer; its weight vector is the direction.

    Returns:
        :class:`Direction` with ``vector`` ``Float[Tensor, "layer d_model"]`` (unit rows), method ``"probe"``,
        ``scores["train_accuracy"]`` per layer.
    """
    _check_entry(harmful, "harmful", position)
    _check_entry(benign, "benign", position)
    layers = _layers(harmful, layers)
    vecs, acc = [], []
    for l in progress(layers, "probe", show_progress):
        h, b = _acts(harmful, resid_pre_name(l), position), _acts(benign, resid_pre_name(l), position)
        if len(h) == 0 or len(b) == 0:
            raise WorkbenchError("a probe needs at least one harmful and one benign prompt")
        x = torch.cat([h, b])
        y = torch.cat([torch.ones(len(h)), torch.zeros(len(b))])
        w, bias = logistic_probe(x, y, l2=l2)
        pred = (x.double() @ w + bias) > 0
        acc.append(float((pred == y.bool()).double().mean()))
        vecs.append((w / w.norm().clamp_min(1e-12)).float())
    fp, d = _fp(model)
    return Direction(torch.stack(vecs), None, position, "probe", fp, d, {"train_accuracy": acc},
                     {"layers": layers, "l2": l2})


def refusal_phrase_token_ids(tokenizer, phrases: Sequence[str] = REFUSAL_PHRASES) -> list[int]:
    """Unique token ids of the refusal phrases (each tokenised bare and with a leading space)."""
    ids: set[int] = set()
    for p in phrases:
        for text in (p, " " + p):
            ids.update(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise WorkbenchError("the refusal phrases produced no tokens")
    return sorted(ids)


@torch.no_grad()
def embedding_centroid(model, phrases: Sequence[str] = REFUSAL_PHRASES) -> Direction:
    """Mean input-embedding row of the refusal phrases' tokens (each token once; the phrases bare and with a
    leading space). The official WAS code's direction is another vector:
    :func:`workbench.steering.official.official_direction`.

    Returns:
        :class:`Direction` with ``vector`` ``Float[Tensor, "d_model"]`` (the raw centroid), no layer,
        method ``"embedding_centroid"``.
    """
    if isinstance(phrases, str) or len(phrases) == 0:
        raise WorkbenchError("embedding_centroid needs a non-empty list of refusal phrases")
    ids = refusal_phrase_token_ids(model.tokenizer, phrases)
    emb = model.original_model.get_input_embeddings().weight
    centroid = emb[torch.tensor(ids, device=emb.device)].float().mean(0).cpu()
    fp, d = _fp(model)
    return Direction(centroid, None, None, "embedding_centroid", fp, d, {}, {"n_tokens": len(ids)})
