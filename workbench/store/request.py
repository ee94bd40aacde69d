"""A resolved request: everything that defines a store entry (prompts, hooks, positions, dtype, model), plus
how to compute it (batch size).

Resolving a request and its content address (:func:`~workbench.store.compute.resolve_request`,
:func:`~workbench.store.compute.entry_key`) live in :mod:`workbench.store.compute`; this module holds the
request itself and its inputs: the prompts, normalised (:func:`normalise_prompts`), and the model's identity
(:func:`model_name`, :func:`model_fingerprint`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd

from ..chat import ChatBatch
from ..errors import WorkbenchError
from ..models import fingerprint


@dataclass
class Request:
    """A fully resolved request (everything that defines the entry, plus how to compute it)."""

    prompts: list[str]
    meta: list[dict] | None
    batch: ChatBatch
    hook_names: list[str]
    positions: list[int] | str
    positions_label: str
    dtype: str
    batch_size: int
    system: str | None
    fingerprint: str
    model_name: str
    n_layers: int
    key: str
    #: ``batch_size="auto"``: the size came from free memory and a shard's forward is split on out-of-memory
    adaptive: bool = False

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def missing(self, manifest: dict | None) -> list[str]:
        """The requested hooks that ``manifest`` (an entry's, or ``None`` for no entry) does not hold yet."""
        if manifest is None:
            return list(self.hook_names)
        return [h for h in self.hook_names if h not in manifest["hooks"]]

    def disagreement(self, manifest: dict) -> str | None:
        """How the manifest of this request's entry (same key) contradicts the request -- its model fingerprint,
        positions, dtype, number of prompts or padded length -- or ``None``. The key is a hash of these, so any
        difference means the manifest was edited (older manifests carry no checksum of their own)."""
        want = {"model fingerprint": (manifest["model"].get("fingerprint"), self.fingerprint),
                "positions": (manifest["positions"], self.positions), "dtype": (manifest["dtype"], self.dtype),
                "n_prompts": (manifest["n_prompts"], self.n_prompts),
                "seq_len": (manifest.get("seq_len", int(self.batch.input_ids.shape[1])), int(self.batch.input_ids.shape[1]))}
        for what, (got, expected) in want.items():
            if got != expected:
                return f"has {what} {got!r:.60}, but the request that hashes to this key has {expected!r:.60}"
        return None


def normalise_prompts(prompts) -> tuple[list[str], list[dict] | None]:
    """``(prompts, per-prompt metadata or None)`` from strings, dicts with a ``"prompt"`` field, or a DataFrame."""
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise WorkbenchError(f"the prompt DataFrame has no 'prompt' column (columns: {list(prompts.columns)})")
        prompts = prompts.to_dict("records")
    if isinstance(prompts, str):
        raise WorkbenchError("prompts must be a list of strings (or of dicts with a 'prompt' field), got a single string")
    if prompts is None or len(prompts) == 0:
        raise WorkbenchError("the prompt list is empty; pass at least one prompt")
    raw, meta = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raw.append(p)
            meta.append({})
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            raw.append(p["prompt"])
            meta.append({k: v for k, v in p.items() if k != "prompt"})
        else:
            raise WorkbenchError(f"prompt {i} is {type(p).__name__} ({p!r:.60}); expected str or a dict with a 'prompt' str")
    return raw, (meta if any(meta) else None)


def model_name(model) -> str:
    """The name the model was loaded by (else its config's ``model_name``), recorded in the manifest."""
    src = getattr(model, "_wb_source", None)
    if src:
        return str(src.get("name"))
    return str(getattr(model.cfg, "model_name", type(model).__name__))


def model_fingerprint(model) -> str:
    """:func:`workbench.models.fingerprint`, recomputed when a parameter or buffer was replaced or edited in place
    since the last call (tracked by data pointer and autograd version counter).

    Edits through ``param.data`` bypass the version counter: call ``fingerprint(model, refresh=True)`` after those.
    """
    orig = getattr(model, "original_model", model)
    sig = tuple((t.data_ptr(), t._version) for t in itertools.chain(orig.parameters(), orig.buffers()))
    seen = getattr(model, "_wb_store_fingerprint", None)
    if seen is not None and seen[0] == sig:
        return seen[1]
    # first use of this model object (possibly a deep copy carrying its original's cached fingerprint) or
    # weights changed: hash the weights again
    fp = fingerprint(model, refresh=True)
    model._wb_store_fingerprint = (sig, fp)
    return fp
