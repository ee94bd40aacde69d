"""Differential neurons: which MLP neurons fire differently on harmful prompts, and how few carry refusal.

**Ranking.** For every neuron ``(layer, i)`` of ``blocks.{l}.mlp.hook_post`` the effect size between harmful
and benign prompts is Cohen's d,

    d = (mean_harmful - mean_benign) / s_pooled,   s_pooled^2 = ((n1 - 1) s1^2 + (n0 - 1) s0^2) / (n1 + n0 - 2)

over one sample per prompt: the neuron's activation averaged over the entry's positions (``pool="mean"``;
store entries at ``positions="post_instruction"`` or ``"last"``), the last position only (``pool="last"``)
or every real position as its own sample (``pool="tokens"``). Sums and sums of squares are streamed shard by
shard in float64. Neurons are ranked by ``|d|`` (both signs: more or less active on harmful prompts).

**Ablation curve** (as in the relation-specific-neurons paper): ablate the top-``n`` neurons for a grid of
``n`` (cumulative: the top-``n`` set contains the top-``m`` set for ``m < n``) and measure the refusal rate of
harmful prompts (greedy replies, substring judge), their mean refusal score, and the loss on harmless held-out
text. The control ablates ``n`` random neurons, several seeds; ``control="layer_matched"`` (default) draws
them from the same layers in the same numbers as the top-``n`` (nested as ``n`` grows), ``"uniform"`` from
every ranked neuron. Ablation is ``mode="zero"`` (``a_i <- 0``, the neuron's "off" state for ReLU/SwiGLU,
default) or ``"mean"`` (``a_i <-`` its mean over both prompt sets at the ranked positions), at every position.

**Halving count.** The smallest ``n`` whose top-``n`` ablation brings the harmful refusal rate to at most half
the unablated rate: found on the grid, then refined by integer bisection between the last grid point that
does not halve and the first that does (this assumes the rate falls with ``n``); the random control is
measured at the same ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import WorkbenchError
from ..progress import progress
from ..vocab import Positions, normalize_positions, is_int
from ._common import d_mlp, entry_layers, entry_mask, iter_real
from .heldout import HeldoutText, lm_loss
from .hooks import neuron_ablation_hooks

POOLS = ("mean", "last", "tokens")
CONTROLS = ("layer_matched", "uniform")
DEFAULT_NS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _moments(entry, hook: str, mask, pool: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, sum, sum of squares)`` over samples of one hook (float64, ``[d]`` each)."""
    n, s, ss = 0, None, None
    for _, x, real in iter_real(entry, hook, mask):
        if pool == "tokens":
            v = x[real].double()
        elif pool == "last":
            if not real[:, -1].all():
                raise WorkbenchError(f"{hook}: the last position is padding in some rows; is the entry left-padded?")
            v = x[:, -1].double()
        else:
            w = real.double()
            cnt = w.sum(1, keepdim=True)
            if (cnt == 0).any():
                raise WorkbenchError(f"{hook}: a prompt has no real position to average over")
            v = (x.double() * w[..., None]).sum(1) / cnt
        n += v.shape[0]
        s = v.sum(0) if s is None else s + v.sum(0)
        ss = (v * v).sum(0) if ss is None else ss + (v * v).sum(0)
    if n == 0:
        raise WorkbenchError(f"{hook}: the entry has no samples")
    return n, s, ss


def cohens_d(n1: int, s1, ss1, n0: int, s0, ss0) -> tuple:
    """Cohen's d from streamed moments; ``(d, mean1, mean0, std1, std0)`` (float64 tensors).

    Neurons with zero pooled variance get ``d = 0`` when their means agree and ``+-inf`` otherwise.
    """
    if n1 < 2 or n0 < 2:
        raise WorkbenchError(f"Cohen's d needs at least 2 samples per group, got {n1} harmful and {n0} benign")
    m1, m0 = s1 / n1, s0 / n0
    v1 = ((ss1 - n1 * m1 * m1) / (n1 - 1)).clamp_min(0)
    v0 = ((ss0 - n0 * m0 * m0) / (n0 - 1)).clamp_min(0)
    sp = torch.sqrt(((n1 - 1) * v1 + (n0 - 1) * v0) / (n1 + n0 - 2))
    diff = m1 - m0
    d = torch.where(sp > 0, diff / torch.where(sp > 0, sp, torch.ones_like(sp)),
                    torch.where(diff == 0, torch.zeros_like(diff), torch.sign(diff) * math.inf))
    return d, m1, m0, v1.sqrt(), v0.sqrt()


def differential_neurons(harmful_entry, benign_entry, layers: Sequence[int] | None = None, pool: str = "mean",
                         show_progress: bool = False) -> pd.DataFrame:
    """Rank every MLP neuron by its harmful-vs-benign effect size (Cohen's d), streaming both entries.

    Args:
        harmful_entry, benign_entry: store entries holding ``mlp.hook_post`` (``Float[Tensor, "prompt pos d_mlp"]``),
            typically at ``positions="post_instruction"`` or ``"last"``.
        layers: a subset of the layers both entries hold (default: all of the harmful entry's).
        pool: ``"mean"`` (average over positions per prompt), ``"last"``, or ``"tokens"`` (every real position).

    Returns:
        One row per neuron, most differential first: ``rank, layer, neuron, cohens_d, abs_d, mean_harmful,
        mean_benign, std_harmful, std_benign, mean_all`` (``mean_all``: mean over both sets' samples, the
        value of mean ablation).
    """
    if pool not in POOLS:
        raise WorkbenchError(f"unknown pool {pool!r}; expected one of {POOLS}")
    hl = entry_layers(harmful_entry, layers)
    bl = dict(entry_layers(benign_entry, [l for l, _ in hl]))
    mh, mb = entry_mask(harmful_entry), entry_mask(benign_entry)
    frames = []
    for layer, hook in progress(hl, "differential neurons", show_progress):
        n1, s1, ss1 = _moments(harmful_entry, hook, mh, pool)
        n0, s0, ss0 = _moments(benign_entry, bl[layer], mb, pool)
        if s1.shape != s0.shape:
            raise WorkbenchError(f"layer {layer}: the entries have different widths ({s1.shape[0]} vs {s0.shape[0]})")
        d, m1, m0, sd1, sd0 = cohens_d(n1, s1, ss1, n0, s0, ss0)
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": np.arange(d.shape[0]), "cohens_d": d.numpy(), "abs_d": d.abs().numpy(),
            "mean_harmful": m1.numpy(), "mean_benign": m0.numpy(), "std_harmful": sd1.numpy(),
            "std_benign": sd0.numpy(), "mean_all": ((s1 + s0) / (n1 + n0)).numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["abs_d", "layer", "neuron"], ascending=[False, True, True], ignore_index=True, kind="stable")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def differential_neurons_for(model, harmful: Sequence[str], benign: Sequence[str], positions: Positions = "post_instruction",
                             layers: Sequence[int] | None = None, pool: str = "mean", store=None,
                             batch_size: int = 32, show_progress: bool = False) -> pd.DataFrame:
    """:func:`differential_neurons` on store entries of ``mlp.hook_post`` of two prompt lists (computed once), at
    ``positions`` (:data:`workbench.vocab.Positions`)."""
    from ..store import get_or_compute

    positions = normalize_positions(positions)

    hooks = ("mlp_post",) if layers is None else ("mlp_post", list(layers))
    eh = get_or_compute(model, list(harmful), hooks=hooks, positions=positions, store=store, batch_size=batch_size,
                        show_progress=show_progress)
    eb = get_or_compute(model, list(benign), hooks=hooks, positions=positions, store=store, batch_size=batch_size,
                        show_progress=show_progress)
    return differential_neurons(eh, eb, layers, pool, show_progress)


# ------------------------------------------------------------------------------------------- ablation
@dataclass
class AblationCurve:
    """Result of :func:`ablation_curve`.

    Attributes:
        curve: long format ``n_ablated, selection, seed, metric, value`` (``selection``: ``differential`` /
            ``random``; ``seed`` is -1 for differential rows; metrics ``refusal_rate``, ``refusal_score``, ``loss``)
            -- the input of ``plots.neuron_ablation_curve``.
        halving: ``n_halving`` (None when no grid point halves), ``base_refusal_rate``,
            ``differential_refusal_rate`` and ``random_refusal_rate`` (mean over seeds) at ``n_halving``,
            ``random_refusal_rates`` (per seed), ``halving_target``, ``mode``, ``control``.
    """

    curve: pd.DataFrame
    halving: dict = field(default_factory=dict)


def _random_sets(ranking: pd.DataFrame, order: pd.DataFrame, ns: list[int], control: str, seed: int) -> dict[int, list]:
    """``{n: [(layer, neuron), ...]}`` random sets of size n, nested in n."""
    gen = np.random.default_rng(seed)
    if control == "uniform":
        perm = gen.permutation(len(ranking))
        pairs = list(zip(ranking["layer"].to_numpy()[perm].tolist(), ranking["neuron"].to_numpy()[perm].tolist()))
        return {n: pairs[:n] for n in ns}
    by_layer = {l: g["neuron"].to_numpy() for l, g in ranking.groupby("layer")}
    perms = {l: gen.permutation(v).tolist() for l, v in by_layer.items()}
    out = {}
    for n in ns:
        counts = order["layer"].iloc[:n].value_counts()
        out[n] = [(int(l), int(i)) for l, c in counts.items() for i in perms[l][:c]]
    return out


def _halving_search(ns: list[int], rates: dict[int, float], base: float) -> tuple[int | None, int | None]:
    """``(n_lo, n_hi)``: the last grid n that does not halve before the first that does (``n_hi`` None if none)."""
    target = base / 2
    prev = 0
    for n in ns:
        if rates[n] <= target:
            return prev, n
        prev = n
    return prev, None


def ablation_curve(
    model,
    ranking: pd.DataFrame,
    harmful: Sequence[str],
    text: HeldoutText | None = None,
    ns: Sequence[int] = DEFAULT_NS,
    mode: str = "zero",
    n_seeds: int = 3,
    control: str = "layer_matched",
    refine: bool = True,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    show_progress: bool = False,
) -> AblationCurve:
    """Cumulative ablation of the top-``n`` differential neurons vs ``n`` random neurons.

    Args:
        ranking: :func:`differential_neurons` output (every neuron of the ranked layers, best first).
        harmful: prompts whose refusal rate is measured (use prompts not used for the ranking).
        text: harmless held-out text for the loss (optional).
        ns: numbers of neurons to ablate (n = 0, no ablation, is always measured).
        mode: ``"zero"`` or ``"mean"`` (uses ``ranking.mean_all``).
        n_seeds: random control sets per ``n``.
        control: ``"layer_matched"`` or ``"uniform"``.
        refine: bisect between grid points for the exact halving count.

    Returns:
        An :class:`AblationCurve`.
    """
    from ..evaluate import evaluate_refusal

    need = {"layer", "neuron", "abs_d", "mean_all"}
    if not isinstance(ranking, pd.DataFrame) or not need <= set(ranking.columns):
        raise WorkbenchError(f"ranking must be the DataFrame of differential_neurons (columns {sorted(need)})")
    if mode not in ("zero", "mean"):
        raise WorkbenchError(f"unknown ablation mode {mode!r}; expected 'zero' or 'mean'")
    if control not in CONTROLS:
        raise WorkbenchError(f"unknown control {control!r}; expected one of {CONTROLS}")
    if isinstance(harmful, str) or len(harmful) == 0:
        raise WorkbenchError("harmful must be a non-empty list of prompts")
    if not is_int(n_seeds) or n_seeds < 1:
        raise WorkbenchError(f"n_seeds must be a positive int, got {n_seeds!r}")
    if text is not None and not isinstance(text, HeldoutText):
        raise WorkbenchError(f"text must be a HeldoutText, got {type(text).__name__}")
    grid = sorted({int(n) for n in ns})
    if not grid or grid[0] < 1 or any(isinstance(n, bool) for n in ns):
        raise WorkbenchError(f"ns must be positive ints, got {list(ns)!r}")
    if grid[-1] > len(ranking):
        raise WorkbenchError(f"ns goes up to {grid[-1]} but the ranking has only {len(ranking)} neurons")
    order = ranking.sort_values("abs_d", ascending=False, kind="stable").reset_index(drop=True)
    values = None
    if mode == "mean":
        values, width = {}, d_mlp(model)
        for l, g in ranking.groupby("layer"):
            if int(g["neuron"].max()) >= width:
                raise WorkbenchError(f"the ranking has neuron {int(g['neuron'].max())} in layer {l}; the model's d_mlp is {width}")
            v = torch.zeros(width)
            v[torch.tensor(g["neuron"].to_numpy())] = torch.tensor(g["mean_all"].to_numpy(), dtype=torch.float32)
            values[int(l)] = v
    harmful = list(harmful)

    def measure(neurons) -> dict:
        hooks = neuron_ablation_hooks(model, neurons, mode, values) if len(neurons) else []
        ev = evaluate_refusal(model, {"harmful": harmful}, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              fwd_hooks=hooks, show_progress=False)
        s = ev.summary()
        out = {"refusal_rate": s["refusal_rate"]["harmful"], "refusal_score": s["refusal_score"]["harmful"]}
        if text is not None:
            out["loss"] = lm_loss(model, text, hooks, batch_size)
        return out

    def top(n):
        return list(zip(order["layer"].iloc[:n].tolist(), order["neuron"].iloc[:n].tolist()))

    rows: list[dict] = []

    def add(n, sel, seed, vals):
        rows.extend({"n_ablated": n, "selection": sel, "seed": seed, "metric": m, "value": v} for m, v in vals.items())

    base = measure([])
    add(0, "differential", -1, base)
    for s in range(n_seeds):
        add(0, "random", s, base)
    diff_rates = {}
    for n in progress(grid, "ablate top-n", show_progress):
        vals = measure(top(n))
        diff_rates[n] = vals["refusal_rate"]
        add(n, "differential", -1, vals)
    rnd = {s: _random_sets(ranking, order, grid, control, seed=s) for s in range(n_seeds)}
    for s in progress(range(n_seeds), "random control", show_progress):
        for n in grid:
            add(n, "random", s, measure(rnd[s][n]))
    base_rate = base["refusal_rate"]
    halving = {"base_refusal_rate": base_rate, "halving_target": base_rate / 2, "mode": mode, "control": control,
               "n_halving": None, "differential_refusal_rate": None, "random_refusal_rate": None,
               "random_refusal_rates": None, "max_n": grid[-1]}
    if base_rate > 0:
        lo, hi = _halving_search(grid, diff_rates, base_rate)
        if hi is not None:
            while refine and hi - lo > 1:
                mid = (lo + hi) // 2
                vals = measure(top(mid))
                add(mid, "differential", -1, vals)
                diff_rates[mid] = vals["refusal_rate"]
                if vals["refusal_rate"] <= base_rate / 2:
                    hi = mid
                else:
                    lo = mid
            rates = []
            for s in range(n_seeds):
                if hi in rnd[s]:
                    r = next(r["value"] for r in rows if r["n_ablated"] == hi and r["selection"] == "random"
                             and r["seed"] == s and r["metric"] == "refusal_rate")
                else:
                    vals = measure(_random_sets(ranking, order, [hi], control, seed=s)[hi])
                    add(hi, "random", s, vals)
                    r = vals["refusal_rate"]
                rates.append(r)
            halving.update(n_halving=hi, differential_refusal_rate=diff_rates[hi],
                           random_refusal_rate=float(np.mean(rates)), random_refusal_rates=rates)
    curve = pd.DataFrame(rows, columns=["n_ablated", "selection", "seed", "metric", "value"])
    curve = curve.sort_values(["metric", "selection", "seed", "n_ablated"], ignore_index=True, kind="stable")
    return AblationCurve(curve, halving)
