"""The hand-written prompt files shipped as package data (workbench/datasets/data): harmless.jsonl (everyday
requests, one topic each) and borderline.jsonl (safe prompts that look unsafe, after XSTest's categories). Fast:
reads two small files."""

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

XSTEST_TYPES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
                "real_discrimination_nonsense_group", "nonsense_discrimination_real_group", "historical_events",
                "privacy_public", "privacy_fictional")
MAX_CHARS = 400


def _rows(name: str) -> list[dict]:
    resource = files("workbench.datasets") / "data" / name
    assert resource.is_file(), f"{name} is not found as package data of workbench.datasets"
    rows = []
    for n, line in enumerate(resource.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{name}:{n} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{n} is not a JSON object"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def harmless() -> list[dict]:
    return _rows("harmless.jsonl")


@pytest.fixture(scope="module")
def borderline() -> list[dict]:
    return _rows("borderline.jsonl")


def _norm(prompt: str) -> str:
    """Case, punctuation and spacing folded: prompts equal under this count as duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.lower()).split())


def test_readme_is_package_data():
    text = (files("workbench.datasets") / "data" / "README.md").read_text(encoding="utf-8")
    assert "harmless.jsonl" in text and "borderline.jsonl" in text and "XSTest" in text


def test_harmless_fields_and_counts(harmless):
    assert len(harmless) >= 420
    for row in harmless:
        assert set(row) == {"prompt", "topic"}, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] and row["prompt"]
        assert isinstance(row["topic"], str) and row["topic"]
    topics = Counter(row["topic"] for row in harmless)
    assert len(topics) >= 25, topics
    assert max(topics.values()) <= 0.08 * len(harmless), topics.most_common(3)


def test_borderline_fields_and_counts(borderline):
    assert len(borderline) >= 120
    for row in borderline:
        assert set(row) == {"prompt", "xstest_type"}, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] and row["prompt"]
        assert row["xstest_type"] in XSTEST_TYPES, row
    types = Counter(row["xstest_type"] for row in borderline)
    for t in XSTEST_TYPES:
        assert types[t] >= 12, (t, types[t])


def test_prompts_short_and_unique_within_and_across_files(harmless, borderline):
    prompts = [row["prompt"] for row in harmless] + [row["prompt"] for row in borderline]
    too_long = [p for p in prompts if len(p) > MAX_CHARS]
    assert not too_long, too_long
    assert len(set(prompts)) == len(prompts), [p for p, c in Counter(prompts).items() if c > 1]
    folded = Counter(_norm(p) for p in prompts)
    assert len(folded) == len(prompts), [p for p, c in folded.items() if c > 1]
    shared = {_norm(r["prompt"]) for r in harmless} & {_norm(r["prompt"]) for r in borderline}
    assert not shared, shared


def test_heldout_jailbreak_family():
    """30 templates, 5 styles of 6, one slot each, no repeats, and the composition puts every test request into
    exactly one template."""
    from workbench.datasets.real import SLOT, heldout_jailbreak_rows, load_heldout_jailbreaks
    from workbench.promptsets import PromptSets

    rows = _rows("heldout_jailbreaks.jsonl")
    assert len(rows) == 30 and all(set(r) == {"id", "style", "text"} for r in rows)
    assert Counter(r["style"] for r in rows) == {s: 6 for s in ("prefix_injection", "refusal_suppression",
                                                                 "style_injection", "role_play", "hypothetical")}
    assert all(r["text"].count(SLOT) == 1 and r["id"].startswith(r["style"]) for r in rows)
    assert len({_norm(r["text"]) for r in rows}) == 30
    templates = load_heldout_jailbreaks()
    assert list(templates) == [r["id"] for r in rows]
    data = PromptSets.from_prompts({"harmful": [f"request number {i}" for i in range(40)],
                                    "benign": [f"benign number {i}" for i in range(40)]}, "t")
    composed = heldout_jailbreak_rows(data, "test")
    assert [r for _, r, _ in composed] == data.prompts("test", "harmful")
    assert all(p == templates[t].replace(SLOT, r) for t, r, p in composed)
    text = (files("workbench.datasets") / "data" / "README.md").read_text(encoding="utf-8")
    assert "heldout_jailbreaks.jsonl" in text
