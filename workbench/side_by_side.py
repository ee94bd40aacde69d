"""Two or more finished runs side by side: the numbers a reader compares between models, in one Markdown table.

``side_by_side({"planted organism": "runs/organism", "organism-smollm2": "runs/organism-smollm2"})`` reads each run
directory's ``summary.json`` (and ``patching/patching_sweeps.csv`` for the top heads and MLPs) and returns the
table's rows; ``workbench run --side-by-side DIR [DIR ...]`` prints it (``--labels`` names the columns). A stage a
run does not hold shows ``n/a``. Nothing is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .errors import WorkbenchError
from .report import rate_with_interval
from .vocab import CATEGORIES as CATS


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def _rate(block: Mapping | None, cat: str) -> str:
    """``"95.3 % [87.1, 98.4]"`` from a block with ``refusal_rate`` (and ``refusal_ci``)."""
    if not block or cat not in (block.get("refusal_rate") or {}):
        return "n/a"
    return rate_with_interval(block["refusal_rate"][cat], (block.get("refusal_ci") or {}).get(cat))


def _num(x, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _top_components(run_dir: Path, component: str, k: int = 3) -> str:
    """The ``k`` largest exact denoising effects of ``component`` (heads: ``L.H``; layers: ``L``), from
    ``patching/patching_sweeps.csv``."""
    from .patching.sites import ALIASES

    path = run_dir / "patching" / "patching_sweeps.csv"
    if not path.is_file():
        return "n/a"
    df = pd.read_csv(path)
    site = ALIASES[component][0] if component in ALIASES else component  # "heads": the per-head sweep of hook_z
    df = df[(df["component"] == site) & (df["method"] == "exact")]
    if df.empty:
        return "n/a"
    if component == "heads":
        best = df.groupby(["layer", "head"])["value"].max().sort_values(ascending=False).head(k)
        return ", ".join(f"L{int(l)}.H{int(h)} {v:.2f}" for (l, h), v in best.items())
    best = df.groupby("layer")["value"].max().sort_values(ascending=False).head(k)
    return ", ".join(f"L{int(l)} {v:.2f}" for l, v in best.items())


def headline_rows(summary: Mapping, run_dir: Path | None = None) -> dict[str, str]:
    """``{row label: value}`` of one run's summary, in reading order (see :func:`side_by_side`)."""
    rows: dict[str, str] = {"model": str(summary.get("model", "n/a"))}
    data = summary.get("data") or {}
    rows["prompt data"] = str(data.get("source", "n/a"))
    n_test = (data.get("n") or {}).get("test") or {}
    rows["test prompts (harmful / jailbreak / benign / borderline)"] = " / ".join(str(n_test.get(c, "n/a")) for c in CATS)
    ev = summary.get("evaluate")
    for c in CATS:
        rows[f"baseline refusal: {c}"] = _rate(ev, c)
    d = summary.get("directions")
    if d:
        sel = d.get("selected") or {}
        n_layers = (summary.get("patching") or {}).get("n_layers")
        rows["direction: layer (of n) / position / method"] = (
            f"{sel.get('layer')}{f' of {n_layers}' if n_layers else ''} / {sel.get('position')} / "
            f"{d.get('artifact_method') or d.get('method')}")
        rr = d.get("refusal_rate") or {}
        rows["direction: harmful refusal, base -> ablated"] = f"{_pct(rr.get('harmful_base'))} -> {_pct(rr.get('harmful_ablated'))}"
        rows["direction: benign refusal, base -> ActAdd"] = f"{_pct(rr.get('benign_base'))} -> {_pct(rr.get('benign_actadd'))}"
        rows["direction: KL on benign under ablation"] = _num(d.get("kl_benign_ablated"))
        rows["direction: cosine with the planted direction"] = _num(d.get("cos_ground_truth"))
    p = summary.get("patching")
    if p:
        rows["patching: pairs; metric clean / corrupted"] = (
            f"{p.get('n_pairs')}; {_num(p.get('clean_metric'), '{:.2f}')} / {_num(p.get('corrupted_metric'), '{:.2f}')}")
        half, most = p.get("resid_first_layer_over_half") or {}, p.get("resid_first_layer_over_0.9") or {}
        rows["patching: first resid_pre layer restoring >= 50 % / >= 90 % (post-instruction)"] = (
            f"{half.get('post_instruction', 'n/a')} / {most.get('post_instruction', 'n/a')}")
        if run_dir is not None:
            rows["patching: top heads (exact)"] = _top_components(run_dir, "heads")
            rows["patching: top attention layers"] = _top_components(run_dir, "attn_out")
            rows["patching: top MLP layers"] = _top_components(run_dir, "mlp_out")
        corr = p.get("pearson_attribution_vs_exact") or {}
        rows["patching: attribution vs exact (Pearson r: resid / attn / mlp / heads)"] = " / ".join(
            _num(corr.get(c), "{:.2f}") for c in ("resid_pre", "attn_out", "mlp_out", "heads"))
    sp = summary.get("sparsity")
    if sp:
        head = sp.get("headline") or {}
        ppl1 = (head.get("ppl1_sparsity") or {}).get("overall")
        rows["sparsity: PPL-1 % sparsity (overall)"] = _pct(ppl1) if ppl1 is not None else "n/a"
        halving = head.get("halving") or (sp.get("differential_neurons") or {}).get("halving") or {}
        if halving:
            rows["sparsity: neurons ablated to halve refusal; refusal differential / random"] = (
                f"{halving.get('n_halving')}; {_pct(halving.get('differential_refusal_rate'))} / "
                f"{_pct(halving.get('random_refusal_rate'))}")
    st = summary.get("steering")
    if st:
        for m, block in (st.get("methods") or {}).items():
            rows[f"steering {m}: test harmful / jailbreak / benign / borderline"] = " / ".join(
                _pct((block.get("refusal_rate") or {}).get(c)) for c in CATS)
            held = block.get("heldout")
            if held:
                rows[f"steering {m}: held-out family harmful / jailbreak / benign / borderline"] = " / ".join(
                    _pct((held.get("refusal_rate") or {}).get(c)) for c in CATS)
    from .pipeline import STAGES

    secs = summary.get("seconds") or {}
    if any(s in secs for s in STAGES):
        rows["run time (min): " + " / ".join(STAGES)] = " / ".join(
            "n/a" if secs.get(s) is None else f"{secs[s] / 60:.1f}" for s in STAGES)
    return rows


def side_by_side(runs: Mapping[str, str | Path]) -> list[str]:
    """Markdown lines of one table: a row per number, a column per run (``{label: run directory}``); a row that
    only some runs have shows ``n/a`` for the others."""
    if not runs:
        raise WorkbenchError("side_by_side needs at least one run directory")
    cols: dict[str, dict[str, str]] = {}
    for label, d in runs.items():
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise WorkbenchError(f"{str(d)!r} holds no summary.json: not a run directory")
        cols[label] = headline_rows(json.loads(path.read_text()), Path(d))
    order: list[str] = []
    for rows in cols.values():
        order += [k for k in rows if k not in order]
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| | " + " | ".join(esc(l) for l in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key in order:
        out.append(f"| {esc(key)} | " + " | ".join(esc(c.get(key, "n/a")) for c in cols.values()) + " |")
    return out


__all__ = ["headline_rows", "side_by_side"]
