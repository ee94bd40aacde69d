"""The main job's report: ``report.md`` and ``report.html`` with the headline tables and every figure."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .vocab import CATEGORIES


def rate_with_interval(rate: float, ci=None, n: int | None = None) -> str:
    """``87.5 % [80.1, 92.4]``: a rate with its 95 % interval in percent (Wilson from ``rate`` and ``n`` when
    ``ci`` is missing, e.g. a summary written before intervals were stored; the rate alone without either)."""
    from .stats import interval_from_rate

    if ci is None and n:
        ci = interval_from_rate(rate, n)
    text = f"{100 * rate:.1f} %"
    return text if ci is None else text + f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _shared_n(methods: dict, cat: str) -> int | None:
    ns = {r.get("n", {}).get(cat) for r in methods.values() if cat in r.get("refusal_rate", {})}
    return ns.pop() if len(ns) == 1 else None


def _rates_table(methods: dict) -> list[str]:
    cats = [c for c in CATEGORIES if any(c in r.get("refusal_rate", {}) for r in methods.values())]
    shared = {c: _shared_n(methods, c) for c in cats}
    heads = [c if shared[c] is None else f"{c} (n {shared[c]})" for c in cats]
    lines = ["Refusal rate with its Wilson 95 % interval over prompts.", "",
             "| method | " + " | ".join(heads) + " | KL benign (first token) | CE benign replies (Δ nats/token) |",
             "|---" * (len(cats) + 3) + "|"]

    def num(x):
        return "-" if x is None else f"{x + 0.0:.4f}"  # + 0.0: no "-0.0000"

    for name, r in methods.items():
        rates, ci, n = r.get("refusal_rate", {}), r.get("refusal_ci", {}), r.get("n", {})
        cells = []
        for c in cats:
            if c not in rates:
                cells.append("-")
                continue
            cell = rate_with_interval(rates[c], ci.get(c), n.get(c))
            cells.append(cell if shared[c] is not None or c not in n else f"{cell} (n {n[c]})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {num(r.get('kl_benign'))} | "
                     f"{num(r.get('ce_benign_delta'))} |")
    return lines


def _heldout_table(methods: dict, families: dict | None = None) -> list[str]:
    """Each method's refusal on the test split beside the held-out family (same plans, same operating points)."""
    held = {m: r["heldout"] for m, r in methods.items() if r.get("heldout")}
    if not held:
        return []
    cats = [c for c in CATEGORIES if any(c in h.get("refusal_rate", {}) for h in held.values())]
    lines = ["## Generalisation: the test split beside the held-out family", "",
             "The same plans at the same operating points (picked on val) on prompts used nowhere else: "
             "test-split requests reworded, and wrapped in jailbreak styles absent from training and selection"
             + (f" ({', '.join(f'{c}: ' + ', '.join(f'{k} {v}' for k, v in f.items()) for c, f in families.items())})"
                if families else "") + ".", "",
             "| method | " + " | ".join(f"{c} test | {c} held-out" for c in cats) + " |",
             "|---" * (2 * len(cats) + 1) + "|"]
    for name, h in held.items():
        r = methods[name]
        cells = []
        for c in cats:
            for src in (r, h):
                rate = src.get("refusal_rate", {}).get(c)
                cells.append("-" if rate is None else
                             rate_with_interval(rate, src.get("refusal_ci", {}).get(c), src.get("n", {}).get(c)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _paired_table(paired: list[dict]) -> list[str]:
    """Exact McNemar tests of each method against a reference on the same prompts, one row per (method, reference)."""
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in paired)]
    lines = ["Paired comparisons on the same test prompts (exact McNemar test): b = prompts the reference refuses "
             "and the method does not, c = the reverse; p two-sided.", "",
             "| method | vs | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    rows: dict = {}
    for r in paired:
        rows.setdefault((r["method"], r["baseline"]), {})[r["category"]] = r
    for (method, base), by_cat in rows.items():
        cells = [f"p {_p(by_cat[c]['p'])} (b {by_cat[c]['b']}, c {by_cat[c]['c']})" if c in by_cat else "-"
                 for c in cats]
        lines.append(f"| {method} | {base} | " + " | ".join(cells) + " |")
    return lines


#: the steering comparison's swept methods: (method, its choice key, what the number is)
OPERATING_POINTS = (("actadd", "actadd_alpha", "α = {:g}"), ("actadd_layer", "actadd_layer_alpha", "α = {:g}"),
                    ("was_bce", "was_bce_alpha", "α = {:g}"), ("was_e2e", "was_e2e_scale", "{:g} × its trained α"))


def _operating_points(choices: dict, config: dict | None = None) -> list[str]:
    """One line per swept method: the operating point picked on val and whether it met the rule
    (``steering.compare.operating_point_ok``); CAST's threshold and the α it borrows from ``actadd``."""
    cfg = config or {}
    rule = ""
    if "max_benign_refusal" in cfg and "max_borderline_refusal" in cfg:
        rule = f"benign refusal <= {cfg['max_benign_refusal']:g} and borderline <= {cfg['max_borderline_refusal']:g}"
        if "max_kl_benign" in cfg:  # runs made before the KL bound and the relative caps had neither
            rule += (f" (or the unsteered val rate where higher), first-token KL on benign <= "
                     f"{cfg['max_kl_benign']:g}")
        rule = f"rule: {rule}; "
    lines = []
    for m, key, fmt in OPERATING_POINTS:
        if key not in choices:
            continue
        met = choices.get(f"{m}_rule_met")
        verdict = ("" if met is None else "; meets the rule" if met else
                   "; **no value of the grid meets the rule**: the smallest is evaluated")
        lines.append(f"- `{m}`: {fmt.format(choices[key])}{verdict}")
    if "cast_threshold" in choices:
        lines.append(f"- `cast`: cosine > {choices['cast_threshold']:.4f} at layer {choices.get('cast_layer')} "
                     f"(F1 {choices.get('cast_f1', float('nan')):.3f} on the training prompts), steering with "
                     f"`actadd`'s α = {choices.get('cast_alpha', float('nan')):g}")
    if not lines:
        return []
    return [f"Operating points picked on val ({rule}every α's val rates in `steering/alpha_curves.csv`):", ""] + lines


def _seeds_table(seeds: dict) -> list[str]:
    """Mean ± sample std [min, max] of each method's test refusal rate over the training seeds."""
    methods = seeds["methods"]
    cats = [c for c in CATEGORIES if any(c in r["refusal_rate"] for r in methods.values())]
    free = ", ".join(f"`{m}`" for m in seeds.get("seed_free", []))
    lines = [f"Over training seeds {seeds['values']}: mean ± sample std [min, max] of the test refusal rate"
             + (f"; seed-free methods, run once: {free}." if free else "."), "",
             "| method | seeds | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    for name, r in methods.items():
        cells, n = [], 1
        for c in cats:
            v = r["refusal_rate"].get(c)
            if v is None:
                cells.append("-")
                continue
            n = v["n"]
            spread = "" if v["std"] is None else f" ± {100 * v['std']:.1f}"
            cells.append(f"{100 * v['mean']:.1f}{spread} % [{100 * v['min']:.1f}, {100 * v['max']:.1f}]")
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def headline_markdown(summary: dict) -> list[str]:
    """The few numbers a reader wants first, as Markdown lines."""
    out = [f"# Refusal workbench report: `{summary.get('model')}`", ""]
    data = summary.get("data")
    if data:
        n = {s: sum(c.values()) for s, c in data.get("n", {}).items()}
        out += [f"Prompt data: `{data.get('source')}` (hash {data.get('hash')}; prompts per split {n}).", ""]
    ev = summary.get("evaluate")
    if ev:
        out += ["## Baseline refusal (test split, greedy, substring judge)", "",
                "| category | refusal rate [Wilson 95 %] | mean refusal score | n |", "|---|---|---|---|"]
        for c, r in ev["refusal_rate"].items():
            out.append(f"| {c} | {rate_with_interval(r, None, ev['n'].get(c))} | "
                       f"{ev['refusal_score'].get(c, float('nan')):.2f} | {ev['n'].get(c)} |")
        out.append("")
    d = summary.get("directions")
    if d:
        out += ["## Refusal direction", "", f"Selected layer {d['selected']['layer']}, position "
                f"{d['selected']['position']}; cosine with the planted direction: {d.get('cos_ground_truth', 'n/a')}; "
                f"KL on benign prompts under ablation: {d.get('kl_benign_ablated')}.", "",
                "```json", json.dumps(d.get("refusal_rate"), indent=2), "```", ""]
    s = summary.get("steering")
    if s:
        out += ["## Weighted Activation Steering vs baselines (test split)", ""] + _rates_table(s["methods"]) + [""]
        points = _operating_points(s.get("choices") or {}, s.get("config"))
        if points:
            out += points + [""]
        if s.get("paired"):
            out += _paired_table(s["paired"]) + [""]
        held = _heldout_table(s["methods"], (s.get("heldout") or {}).get("families"))
        if held:
            out += held + [""]
        if s.get("seeds"):
            out += _seeds_table(s["seeds"]) + [""]
    for stage in ("patching", "sparsity"):
        if summary.get(stage):
            block = {k: v for k, v in summary[stage].items() if k not in ("config",)}
            out += [f"## {stage.capitalize()}", "", "```json", json.dumps(block, indent=2, default=str)[:6000], "```", ""]
    if summary.get("seconds"):
        out += ["## Run time (seconds)", ""]
        if summary.get("earlier"):
            out += [f"Finished by an earlier run into this directory and not run again now (each as its own "
                    f"record left it): {', '.join(summary['earlier'])}.", ""]
        if summary.get("reused"):
            out += [f"Reused from the previous run into this directory (same model, configuration and code): "
                    f"{', '.join(summary['reused'])}.", ""]
        out += ["```json", json.dumps(summary["seconds"], indent=2), "```", ""]
    return out


#: a run directory's hand-written notes, placed in its report after the numbers (``--report-only`` refreshes it)
NOTES = "notes.md"


def write_report(summary: dict, figures: list[tuple[str, str, Path]], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md`` (figures as PNG links; the run directory's ``notes.md``, when it has one, after the
    numbers) and ``report.html`` (interactive figures in iframes)."""
    out_dir = Path(out_dir)
    md = headline_markdown(summary)
    notes = out_dir / NOTES
    if notes.is_file():   # the researcher's own notes on this run (e.g. targets met or not), kept verbatim
        md += ["## Notes (written for this run)", "", notes.read_text(encoding="utf-8").strip(), ""]
    md += ["## Figures", ""]
    for stage, title, path in figures:
        rel = path.relative_to(out_dir)
        png = rel.with_suffix(".png")
        md += [f"### {title}", "", f"![{title}]({png})" if (out_dir / png).exists() else "", f"[interactive]({rel})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    body = []
    for line in headline_markdown(summary):
        body.append(f"<pre>{html.escape(line)}</pre>" if line else "")
    figs = "".join(
        f"<h3>{html.escape(t)}</h3><iframe src='{p.relative_to(out_dir)}' width='100%' height='560' "
        f"style='border:0'></iframe>" for _, t, p in figures
    )
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>workbench report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto} pre{margin:0}</style></head><body>"
            + "".join(body) + "<h2>Figures</h2>" + figs + "</body></html>")
    (out_dir / "report.html").write_text(page)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html"}


#: Run artifacts copied to ``<dest>/data`` by :func:`publish_run` (small tables the paper-figures notebook reads).
PUBLISHED_DATA = (
    "summary.json",
    "directions/candidate_scores.csv",
    "directions/projections.csv",
    "patching/patching.json",
    "patching/patching_sweeps.csv",
    "patching/patching_subspace.csv",
    "sparsity/*.csv",
    "steering/steering.json",
    "steering/alpha_curves.csv",
    "steering/steering_generations.jsonl",
    "steering/steering_heldout_generations.jsonl",
)


#: what replaces a reply to a harmful or jailbreak prompt that was not refused, in published tables
WITHHELD = "[withheld: reply not judged a refusal]"
#: figures that show replies verbatim; left out of a publication that withholds compliant replies
REPLY_FIGURES = ("example_generations",)


def withhold_compliant_replies(table):
    """A copy of ``table`` (with ``reply`` and ``category`` columns) whose replies to harmful-like prompts that
    were not refused (``refused`` false or missing) read :data:`WITHHELD`; the verdicts and scores stay."""
    from .vocab import HARMFUL_LIKE

    out = table.copy()
    harmful = out["category"].isin(list(HARMFUL_LIKE))
    refused = out["refused"].fillna(False).astype(bool) if "refused" in out.columns else False
    out.loc[harmful & ~refused, "reply"] = WITHHELD
    return out


def _withhold_in_file(path: Path) -> None:
    import pandas as pd

    if path.suffix == ".jsonl":
        table = pd.read_json(path, orient="records", lines=True)
    elif path.suffix == ".csv":
        table = pd.read_csv(path)
    else:
        return
    if not {"reply", "category"} <= set(table.columns):
        return
    table = withhold_compliant_replies(table)
    if path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_csv(path, index=False)


def publish_run(run_dir: str | Path, dest: str | Path = "figures", withhold_compliant: bool | None = None) -> Path:
    """Copy a main-job run's figures, report and small data tables into ``dest`` (the repository's ``figures/``).

    Layout: ``dest/*.png|*.html`` (+ one ``plotly.min.js``), ``dest/report.md`` and ``report.html`` with links
    rewritten to the flat layout, and ``dest/data/`` with the tables of :data:`PUBLISHED_DATA` (the
    paper-figures notebook rebuilds the figures from them). Old files in ``dest`` are replaced, not merged;
    a subdirectory holding its own ``report.md`` (another run's publication) is left alone.

    Args:
        withhold_compliant: replace every reply to a harmful or jailbreak prompt that was not refused by
            :data:`WITHHELD` in the published tables and leave out the figures of :data:`REPLY_FIGURES` (a
            real model's compliant replies to harmful requests are never published; verdicts and scores are).
            ``None``: on for every model but the organism, whose replies are its own templates.
    """
    import shutil

    from .errors import WorkbenchError

    run, dest = Path(run_dir), Path(dest)
    if not (run / "summary.json").exists() or not (run / "figures").is_dir():
        raise WorkbenchError(f"{run} is not a finished main-job run (no summary.json or figures/); run `workbench run` first")
    if withhold_compliant is None:
        withhold_compliant = json.loads((run / "summary.json").read_text()).get("model") != "organism"
    if dest.exists():
        for p in dest.iterdir():
            if p.is_dir() and (p / "report.md").exists():
                continue   # another run's publication inside this one (figures/smollm2 in figures/): kept
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    left_out = set()
    for p in sorted((run / "figures").iterdir()):
        if withhold_compliant and p.stem in REPLY_FIGURES:
            left_out.add(p.stem)
            continue
        if p.is_file():
            shutil.copy2(p, dest / p.name)
    for name in ("report.md", "report.html"):
        if (run / name).exists():
            text = (run / name).read_text()
            text = text.replace("](figures/", "](").replace("src='figures/", "src='")
            for stem in sorted(left_out):
                note = "Left out: this figure shows replies verbatim; the verdicts are in data/steering/."
                if name == "report.md":
                    text = re.sub(rf"!\[[^\]]*\]\({stem}\.png\)", note, text)
                    text = text.replace(f"[interactive]({stem}.html)", "")
                else:
                    text = text.replace(f"src='{stem}.html'", f"srcdoc='{note}'")
            (dest / name).write_text(text)
    data = dest / "data"
    for pattern in PUBLISHED_DATA:
        for src in sorted(run.glob(pattern)):
            target = data / src.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            if withhold_compliant:
                _withhold_in_file(target)
    return dest
