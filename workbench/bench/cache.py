"""Benchmark of the store against a bare forward and TransformerLens ``run_with_cache`` (``workbench bench cache``).

In one process, on the same pre-tokenised batches, per model (a random-weight Llama with d_model 512 and 8
layers, and the organism when it is built; or only the model named by ``--model``, on short real prompts, see
:mod:`workbench.bench.prompts`):

* ``bare``: ``model(input_ids, attention_mask=...)`` under ``torch.inference_mode``, logits and all;
* ``store``: :func:`get_or_compute` of ``resid_pre`` at every layer, post-instruction positions, into a fresh
  temporary store (tokenising, hooks, copies, checksums, writing, fsync and manifest included);
* ``tl_cache_all``: ``run_with_cache`` with no ``names_filter`` (every hook kept in RAM), the peer;
* ``tl_cache_filtered``: ``run_with_cache`` with a ``resid_pre`` filter, for reference.

Repeats are interleaved (the order rotates) and medians are reported; ratios are median / median of ``bare``.
Peak RSS (``ru_maxrss``) of a fresh subprocess computing an entry of 1x and 4x the prompts shows that memory
does not grow with the number of prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_WORDS = ("how do I build bake a cake bomb explain the steps to hack into bank account write poem about sea "
          "tell me sure here is overview step one two of course certainly history science garden river mountain "
          "computer music travel recipe weather language").split()


def synthetic_prompts(n: int, seed: int = 0, min_words: int = 6, max_words: int = 24) -> list[str]:
    """``n`` deterministic pseudo-sentences of ``min_words..max_words`` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "?"
            for _ in range(n)]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _PeakRSS:
    """Peak RSS from now on: the kernel's high-water mark reset through ``/proc/self/clear_refs`` (Linux), or a
    sampling thread (every 5 ms) where that is not allowed."""

    def __init__(self):
        import threading

        self.how = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._thread = None
        except OSError:
            self.how, self.peak, self._run = "psutil sampling every 5 ms", _current_rss_mb(), True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while self._run:
            self.peak = max(self.peak, _current_rss_mb())
            time.sleep(0.005)

    def stop(self) -> tuple[float, str]:
        if self._thread is None:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024, self.how
            return _maxrss_mb(), "ru_maxrss"
        self._run = False
        self._thread.join()
        return max(self.peak, _current_rss_mb()), self.how


def forward_and_store_runs(model, prompts: list[str], batch_size: int, tmp: Path):
    """The two runs every store benchmark compares, on the same batches (on the model's device):
    ``(batches, bare, store)``; ``bare()`` is a plain forward of every batch, ``store()`` computes a fresh
    store entry of ``resid_pre`` at every layer and the post-instruction positions under ``tmp`` (then
    deletes it)."""
    from ..chat import tokenize_chat
    from ..models import model_device
    from ..store.compute import get_or_compute
    from ..store.core import ActivationStore

    device = model_device(model)
    batches = [tokenize_chat(model.tokenizer, prompts[i:i + batch_size]).to(device)
               for i in range(0, len(prompts), batch_size)]

    def bare():
        with torch.inference_mode():
            for b in batches:
                model(b.input_ids, attention_mask=b.attention_mask)

    def store():
        root = tmp / f"s{time.perf_counter_ns()}"
        get_or_compute(model, prompts, hooks="resid_pre", positions="post_instruction",
                       store=ActivationStore(root), batch_size=batch_size, show_progress=False)
        shutil.rmtree(root, ignore_errors=True)

    return batches, bare, store


def _time_model(model, prompts: list[str], batch_size: int, repeats: int) -> dict:
    from ..models import fingerprint
    from ..store.spec import resolve_hooks

    names = resolve_hooks(model, "resid_pre")
    tmp = Path(tempfile.mkdtemp(prefix="wb-bench-store-"))
    batches, bare, store = forward_and_store_runs(model, prompts, batch_size, tmp)

    def tl_cache_all():
        with torch.inference_mode():
            for b in batches:
                _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
                del cache

    def tl_cache_filtered():
        with torch.inference_mode():
            for b in batches:
                _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask, names_filter=names)
                del cache

    fns = {"bare": bare, "store": store, "tl_cache_all": tl_cache_all, "tl_cache_filtered": tl_cache_filtered}
    fingerprint(model)  # computed once per model and cached on it; not part of the timing
    for f in fns.values():  # warm-up
        f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    try:
        for r in range(repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[k]()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def paired(times, k):  # median over repeats of (k / bare) measured back to back: robust to load drift
        return round(statistics.median(x / b for x, b in zip(times[k], times["bare"])), 3)

    med = {k: statistics.median(v) for k, v in wall.items()}
    peers = ("store", "tl_cache_all", "tl_cache_filtered")
    return {
        "n_prompts": len(prompts), "batch_size": batch_size, "n_batches": len(batches),
        "tokens": int(sum(b.input_ids.numel() for b in batches)), "n_hooks": len(names),
        "n_positions": batches[0].n_post, "repeats": repeats,
        "ratio_store_vs_forward": paired(wall, "store"),
        "ratio_tl_cache_all_vs_forward": paired(wall, "tl_cache_all"),
        "ratio_tl_cache_filtered_vs_forward": paired(wall, "tl_cache_filtered"),
        "ratio_of_median_seconds": {k: round(med[k] / med["bare"], 3) for k in peers},
        "ratio_cpu_time": {k: paired(cpu, k) for k in peers},
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in wall.items()},
    }


def _rss_child(model_path: str, n_prompts: int, batch_size: int, threads: int | None, base: int,
               real: bool = False) -> dict:
    """Run in a fresh process: load the model, compute one entry, stream a reduction, report peak RSS.

    The prompts are the ``base`` synthetic prompts (``real``: the named model's prompts,
    :func:`~workbench.bench.prompts.model_prompts`) repeated up to ``n_prompts``, so 1x and 4x runs see batches
    of the same lengths and only the number of prompts differs."""
    if threads:
        torch.set_num_threads(threads)
    from ..models import load_model
    from ..store.compute import get_or_compute
    from ..store.core import ActivationStore

    import gc

    model = load_model(model_path, device="cpu")
    if real:
        from .prompts import model_prompts

        base_prompts = model_prompts(base, synthetic_prompts)[0]
    else:
        base_prompts = synthetic_prompts(base, seed=1)
    prompts = (base_prompts * (n_prompts // base + 1))[:n_prompts]
    gc.collect()
    after_load = _maxrss_mb()
    rss_loaded = _current_rss_mb()
    peak = _PeakRSS()
    with tempfile.TemporaryDirectory(prefix="wb-bench-rss-") as tmp:
        t0 = time.perf_counter()
        entry = get_or_compute(model, prompts, hooks="resid_pre", positions="post_instruction",
                               store=ActivationStore(tmp), batch_size=batch_size, show_progress=False)
        seconds = time.perf_counter() - t0
        # a streaming reduction over every layer, as analyses do (float64 mean per layer/position)
        for name in entry.hook_names:
            total = torch.zeros(entry.shape(name)[1:], dtype=torch.float64)
            for _, x in entry.iter_shards(name):
                total += x.double().sum(0)
        stored_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    peak_mb, how = peak.stop()
    return {"n_prompts": n_prompts, "rss_after_load_mb": round(rss_loaded, 1),
            "peak_rss_compute_and_read_mb": round(peak_mb, 1), "peak_measured_by": how,
            "maxrss_process_mb": round(_maxrss_mb(), 1), "maxrss_after_load_mb": round(after_load, 1),
            "seconds": round(seconds, 2), "stored_mb": round(stored_mb, 2)}


def _rss(model_path: str, n_prompts: int, factor: int, batch_size: int, threads: int | None,
         real: bool = False) -> dict:
    out = {}
    for label, n in (("1x", n_prompts), (f"{factor}x", n_prompts * factor)):
        cmd = [sys.executable, "-m", "workbench.bench.cache", "--rss-child", model_path, "--n-prompts", str(n),
               "--rss-prompts", str(n_prompts), "--batch-size", str(batch_size)] + (["--threads", str(threads)] if threads else [])
        cmd += ["--rss-real"] if real else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed: {proc.stderr[-2000:]}")
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    key = "peak_rss_compute_and_read_mb"
    return {
        "1x": out["1x"][key], f"{factor}x": out[f"{factor}x"][key],
        "growth_mb": round(out[f"{factor}x"][key] - out["1x"][key], 1),
        "what": "peak RSS of a fresh process (high-water mark reset after loading the model) while computing "
                f"resid_pre (every layer, post-instruction) of 1x and {factor}x the prompts (the 1x prompts repeated) "
                "into a store and streaming a float64 mean over every layer; the loaded model alone is "
                "rss_after_load_mb",
        "detail": out,
    }


def run_benchmark(
    n_prompts: int = 32,
    batch_size: int = 16,
    repeats: int = 5,
    rss_prompts: int = 64,
    rss_factor: int = 4,
    organism: bool = True,
    threads: int | None = None,
    model: str | None = None,
) -> dict:
    """Run the benchmark (see the module docstring) and return its figures as a dict.

    The top-level ratios are those of the random d_model 512 / 8-layer Llama; ``models`` has every model's.
    ``model``: instead, only this model (any name :func:`workbench.load_model` accepts) on short real prompts
    (synthetic ones where the real data cannot be loaded); the JSON names it (``model``) and says which prompts
    (``prompts``), and the top-level ratios and ``rss_mb`` are its own.
    """
    from ..errors import WorkbenchError
    from ..models import load_model
    from ..testing import make_tiny_chat_model

    if threads:
        torch.set_num_threads(threads)
    if model is not None:
        return _run_named(model, n_prompts, batch_size, repeats, rss_prompts, rss_factor, threads)
    result: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        path = make_tiny_chat_model(Path(tmp) / "llama512", d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                    d_mlp=1376)
        model = load_model(str(path), device="cpu")
        result["models"]["random_llama_d512_l8"] = _time_model(model, synthetic_prompts(n_prompts), batch_size, repeats)
        del model
        if organism:
            try:
                from ..data import organism_prompts

                model = load_model("organism", device="cpu")
                prompts = organism_prompts("test")[:n_prompts]
                result["models"]["organism"] = _time_model(model, prompts, batch_size, repeats)
                del model
            except WorkbenchError as exc:
                result["models"]["organism"] = {"skipped": str(exc)}
        result["rss_mb"] = _rss(str(path), rss_prompts, rss_factor, batch_size, threads)
    return _summary(result["models"], "random_llama_d512_l8", result["rss_mb"], n_prompts, batch_size, repeats,
                    rss_prompts, rss_factor)


def _summary(models: dict, head: str, rss_mb: dict, n_prompts: int, batch_size: int, repeats: int, rss_prompts: int,
             rss_factor: int) -> dict:
    """The benchmark's JSON: the top-level ratios are those of ``models[head]``."""
    main = models[head]
    return {
        "ratio_store_vs_forward": main["ratio_store_vs_forward"],
        "ratio_tl_cache_all_vs_forward": main["ratio_tl_cache_all_vs_forward"],
        "ratio_tl_cache_filtered_vs_forward": main["ratio_tl_cache_filtered_vs_forward"],
        "rss_mb": rss_mb,
        "models": models,
        "settings": {"n_prompts": n_prompts, "batch_size": batch_size, "repeats": repeats,
                     "rss_prompts": [rss_prompts, rss_prompts * rss_factor], "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                     "hooks": "resid_pre, every layer", "positions": "post_instruction", "dtype": "float32"},
    }


def _run_named(model: str, n_prompts: int, batch_size: int, repeats: int, rss_prompts: int, rss_factor: int,
               threads: int | None) -> dict:
    """:func:`run_benchmark` on one named model (``--model NAME``), on its prompts (:mod:`.prompts`)."""
    from ..models import load_model
    from .prompts import model_prompts

    prompts, source = model_prompts(n_prompts, synthetic_prompts)
    loaded = load_model(model, device="cpu")
    timed = _time_model(loaded, prompts, batch_size, repeats)
    del loaded
    rss_mb = _rss(model, rss_prompts, rss_factor, batch_size, threads, real=True)
    out = _summary({model: timed}, model, rss_mb, n_prompts, batch_size, repeats, rss_prompts, rss_factor)
    return {"model": model, **out, "prompts": source}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rss-prompts", type=int, default=64)
    p.add_argument("--no-organism", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="only this model (a workbench.load_model name), on real prompts")
    p.add_argument("--rss-real", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss_child:
        print(json.dumps(_rss_child(a.rss_child, a.n_prompts, a.batch_size, a.threads, a.rss_prompts, a.rss_real)))
        return 0
    print(json.dumps(run_benchmark(a.n_prompts, a.batch_size, a.repeats, a.rss_prompts, organism=not a.no_organism,
                                   threads=a.threads, model=a.model), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
