"""The main job's report: ``report.md`` and ``report.html`` with the headline tables and every figure."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _rates_table(methods: dict) -> list[str]:
    cats = ["harmful", "jailbreak", "benign", "borderline"]
    lines = ["| method | " + " | ".join(cats) + " | KL benign |", "|---" * (len(cats) + 2) + "|"]
    for name, r in methods.items():
        rates = r.get("refusal_rate", {})
        cells = [f"{100 * rates[c]:.1f} %" if c in rates else "-" for c in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('kl_benign', '-')} |")
    return lines


def headline_markdown(summary: dict) -> list[str]:
    """The few numbers a reader wants first, as Markdown lines."""
    out = [f"# Refusal workbench report: `{summary.get('model')}`", ""]
    ev = summary.get("evaluate")
    if ev:
        out += ["## Baseline refusal (test split, greedy, substring judge)", "",
                "| category | refusal rate | mean refusal score | n |", "|---|---|---|---|"]
        for c, r in ev["refusal_rate"].items():
            out.append(f"| {c} | {100 * r:.1f} % | {ev['refusal_score'].get(c, float('nan')):.2f} | {ev['n'].get(c)} |")
        out.append("")
    d = summary.get("directions")
    if d:
        out += ["## Refusal direction", "", f"Selected layer {d['selected']['layer']}, position "
                f"{d['selected']['position']}; cosine with the planted direction: {d.get('cos_ground_truth', 'n/a')}; "
                f"KL on harmless prompts under ablation: {d.get('kl_harmless_ablated')}.", "",
                "```json", json.dumps(d.get("refusal_rate"), indent=2), "```", ""]
    s = summary.get("steering")
    if s:
        out += ["## Weighted Activation Steering vs baselines (test split)", ""] + _rates_table(s["methods"]) + [""]
    for stage in ("patching", "sparsity"):
        if summary.get(stage):
            block = {k: v for k, v in summary[stage].items() if k not in ("config",)}
            out += [f"## {stage.capitalize()}", "", "```json", json.dumps(block, indent=2, default=str)[:6000], "```", ""]
    if summary.get("seconds"):
        out += ["## Run time (seconds)", "", "```json", json.dumps(summary["seconds"], indent=2), "```", ""]
    return out


def write_report(summary: dict, figures: list[tuple[str, str, Path]], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md`` (figures as PNG links) and ``report.html`` (interactive figures in iframes)."""
    out_dir = Path(out_dir)
    md = headline_markdown(summary)
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
