"""Benchmark: the batched resid_pre sweep vs TransformerLens ``patching.get_act_patch_resid_pre``.

Both run in one process on the same model, pairs and metric: ours is :func:`prepare` + :func:`exact_patch`
(both forwards included), the peer is ``run_with_cache`` on the clean prompts + ``get_act_patch_resid_pre``
(one forward per layer x position cell). ``get_act_patch_resid_pre`` passes no attention mask, so the pairs
are chosen with one common token length (no padding). Times are medians of ``repeats`` interleaved runs.

A model named in ``--models`` other than ``organism`` and ``random512`` (any name :func:`workbench.load_model`
accepts, e.g. ``smollm2-135m-instruct``) is patched on short real harmful / benign test prompts matched by token
length, at the shortest length with ``n_pairs`` pairs (the peer's cost grows with the square of the length);
synthetic pairs where the real data cannot be loaded (:mod:`workbench.bench.prompts`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import WorkbenchError
from ..models import model_device
from ..patching.exact import exact_patch, prepare
from ..patching.metrics import make_metric
from ..patching.pairs import PromptPairs, make_pairs


def candidate_pairs(limit: int = 400) -> tuple[list[str], list[str]]:
    """Harmful / harmless prompts built from the organism corpus word lists (same template, different request)."""
    from ..organism.corpus import BENIGN_THEMES, HARMFUL_THEMES, REQUEST_TEMPLATES

    harmful = [(v, o) for verbs, objs in HARMFUL_THEMES for v, o in itertools.product(verbs, objs)]
    benign = [(v, o) for verbs, objs in BENIGN_THEMES for v, o in itertools.product(verbs, objs)]
    clean, corrupted = [], []
    for shift in range(len(benign)):
        for i, (template, (hv, ho)) in enumerate(itertools.product(REQUEST_TEMPLATES, harmful)):
            if (i + shift) % 5:
                continue
            bv, bo = benign[(i * 7 + shift) % len(benign)]
            clean.append(template.format(verb=hv, obj=ho))
            corrupted.append(template.format(verb=bv, obj=bo))
            if len(clean) >= limit:
                return clean, corrupted
    return clean, corrupted


def same_length_pairs(tokenizer, clean: list[str], corrupted: list[str], n_pairs: int,
                      shortest: bool = False) -> PromptPairs:
    """Up to ``n_pairs`` equal-length pairs that all share the most common token length (no padding at all);
    ``shortest``: the shortest length with ``n_pairs`` pairs instead (the most common when none has)."""
    pairs = make_pairs(tokenizer, clean, corrupted, drop_unequal=True)
    lengths = pairs.attention_mask.sum(-1).tolist()
    counts = Counter(lengths)
    common, _ = counts.most_common(1)[0]
    if shortest:
        common = min((n for n, c in counts.items() if c >= n_pairs), default=common)
    keep, seen = [], set()
    for i, n in enumerate(lengths):
        if n == common and pairs.clean[i] not in seen:
            seen.add(pairs.clean[i])
            keep.append(i)
        if len(keep) >= n_pairs:
            break
    return make_pairs(tokenizer, [pairs.clean[i] for i in keep], [pairs.corrupted[i] for i in keep])


def real_pairs(tokenizer, n_pairs: int) -> tuple[PromptPairs, dict]:
    """``n_pairs`` pairs of a short real harmful and benign test prompt of one common token length, the shortest
    with ``n_pairs`` pairs, and their ``pairs`` record; synthetic pairs (:func:`candidate_pairs`) where the real data
    cannot be loaded or has no equal-length pairs."""
    from ..patching.pairs import pairs_by_length
    from .prompts import REAL_SOURCE, fell_back, real_prompts

    try:
        matched = pairs_by_length(tokenizer, *real_prompts(), limit=None)
        source = {"source": f"{REAL_SOURCE}; matched by token length, the shortest length with n_pairs pairs"}
        clean, corrupted = matched.clean, matched.corrupted
    except WorkbenchError as exc:
        source = fell_back(exc, "synthetic pairs (candidate_pairs: the organism's request templates)")
        clean, corrupted = candidate_pairs()
    return same_length_pairs(tokenizer, clean, corrupted, n_pairs, shortest=True), source


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send file descriptor 1 to stderr (the tokenizer trainer writes progress straight to fd 1), so that
    ``--json`` output stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _quiet_tl(quiet: bool):
    """Silence the progress bar ``transformer_lens.patching`` always draws (restored afterwards)."""
    import transformer_lens.patching as tlp

    if not quiet:
        yield
        return
    original = tlp.tqdm
    tlp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        tlp.tqdm = original


def bench_model(model, pairs: PromptPairs, repeats: int = 3, show_progress: bool = False) -> dict:
    """Time ours vs ``get_act_patch_resid_pre`` on one model; max abs diff of the raw metric grids."""
    import transformer_lens.patching as tlp

    if pairs.padded:
        raise WorkbenchError("the benchmark needs pairs of one common length (the peer passes no attention mask)")
    metric = make_metric(model, "refusal_score")
    dev = model_device(model)
    pairs = pairs.to(dev)

    def tl_metric(logits):
        return metric(logits[:, -1]).mean()

    def ours():
        runs = prepare(model, pairs, metric, ["resid_pre"])
        return exact_patch(model, runs, "resid_pre", show_progress=show_progress)

    def peer():
        _, cache = model.run_with_cache(pairs.clean_ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        with _quiet_tl(not show_progress), torch.no_grad():
            out = tlp.get_act_patch_resid_pre(model, pairs.corrupted_ids, cache, tl_metric)
        if dev.type == "cuda":  # the peer's metric grid stays on the GPU: wait for its last kernels
            torch.cuda.synchronize(dev)
        return out

    t_ours, t_peer = [], []
    res = ref = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = peer()
        t_peer.append(time.perf_counter() - t0)
    assert res is not None and ref is not None
    diff = float((res.raw - ref.float().cpu()).abs().max())
    med_ours, med_peer = statistics.median(t_ours), statistics.median(t_peer)
    return {
        "n_pairs": pairs.n_pairs,
        "n_pos": pairs.n_pos,
        "n_layers": int(model.cfg.n_layers),
        "d_model": int(model.cfg.d_model),
        "cells": int(res.values.numel()),
        "engine": res.engine,
        "seconds_ours": round(med_ours, 4),
        "seconds_transformer_lens": round(med_peer, 4),
        "speedup_vs_transformer_lens": round(med_peer / med_ours, 2),
        "max_abs_diff_vs_transformer_lens": diff,
        "times_ours": [round(t, 4) for t in t_ours],
        "times_transformer_lens": [round(t, 4) for t in t_peer],
    }


def bench_patch(models: tuple[str, ...] = ("organism", "random512"), n_pairs: int = 4, repeats: int = 3,
                device: str | None = "cpu", show_progress: bool = False) -> dict:
    """The ``workbench bench patch`` benchmark.

    Args:
        models: ``"organism"`` (skipped with a note when it is not built), ``"random512"`` (a random-weight
            Llama, d_model 512, 8 layers, GQA 8/4 heads, d_mlp 1376, written to a temp dir) or any other name
            :func:`workbench.load_model` accepts (a registered real model, a path...), patched on
            :func:`real_pairs` (its details say which under ``pairs``).
        n_pairs: pairs per sweep. repeats: timing repeats (median reported).

    Returns:
        ``{"max_abs_diff_vs_transformer_lens": worst over models, "speedup_vs_transformer_lens": smallest
        over models, "models": {name: details}}``.
    """
    from ..models import load_model
    from ..testing import make_tiny_chat_model

    out: dict = {"models": {}, "skipped": {}}
    clean, corrupted = candidate_pairs()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            try:
                if name == "random512":
                    with _stdout_to_stderr():
                        path = make_tiny_chat_model(Path(tmp) / "random512", d_model=512, n_layers=8, n_heads=8,
                                                    n_kv_heads=4, d_mlp=1376)
                    model = load_model(str(path), device=device)
                else:
                    model = load_model(name, device=device)
            except WorkbenchError as exc:
                out["skipped"][name] = str(exc)
                continue
            pairs, source = None, None
            if name not in ("organism", "random512"):
                pairs, source = real_pairs(model.tokenizer, n_pairs)
            elif name == "organism":
                from ..models import organism_dir
                from ..patching.pairs import read_pairs

                file = organism_dir() / "pairs.jsonl"
                if file.exists():
                    c, k = read_pairs(file)
                    pairs = same_length_pairs(model.tokenizer, c, k, n_pairs)
            if pairs is None:
                pairs = same_length_pairs(model.tokenizer, clean, corrupted, n_pairs)
            out["models"][name] = bench_model(model, pairs, repeats, show_progress)
            if source is not None:
                out["models"][name]["pairs"] = source
            del model
    if not out["models"]:
        raise WorkbenchError(f"no model could be benchmarked: {out['skipped']}")
    runs = out["models"].values()
    out["max_abs_diff_vs_transformer_lens"] = max(r["max_abs_diff_vs_transformer_lens"] for r in runs)
    out["speedup_vs_transformer_lens"] = min(r["speedup_vs_transformer_lens"] for r in runs)
    if not out["skipped"]:
        del out["skipped"]
    return out
