"""GPU benchmark on a random-weight Llama-3.2-1B-shaped model: store, steered generation and patching vs peers.

    python benchmarks/gpu.py                         # CUDA, bfloat16, the 1B shape (needs a GPU, ~6 GB)
    python benchmarks/gpu.py --device cpu --small    # smoke test: tiny shape, float32, a few seconds

The model is written to a temporary directory (random weights; a small BPE tokenizer with the Llama-3 chat
template) and loaded with :func:`workbench.load_model`, like any local checkpoint. In one process, on the same
inputs (medians of ``--repeats`` interleaved runs, CUDA synchronised around every timed call):

* ``store``: :func:`workbench.store.get_or_compute` of ``resid_pre`` at every layer and the post-instruction
  positions into a fresh store (copies to the CPU, checksums, writing included) vs a bare forward of the same
  batches (logits and all). Ratio < 1: faster than the bare forward (the store stops after the last hook).
* ``generation``: WAS-steered batched generation (random controller, clean prefill included) vs plain Hugging
  Face ``generate`` of an unwrapped ``LlamaForCausalLM`` loaded from the same files (its default attention, and
  eager attention as the bridge uses); every run generates exactly ``--max-new-tokens`` tokens per prompt.
* ``patching``: the batched ``resid_pre`` sweep (``prepare`` + ``exact_patch``) vs TransformerLens
  ``get_act_patch_resid_pre`` (``workbench.bench.patch.bench_model``), with the max abs difference.

Prints one JSON object with the device name, the date and every figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

#: Llama-3.2-1B: hidden 2048, 16 layers, 32 heads (8 key/value), MLP 8192, vocab 128256, tied embeddings.
SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072)
#: The smoke-test shape (same structure, tiny).
SHAPE_SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=1024, tie_word_embeddings=True, rope_theta=500000.0,
                   max_position_embeddings=2048)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo`` (with the core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def write_random_llama(path: Path, shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """A random-weight Llama of ``shape`` with a Llama-3 chat template, saved as a local HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.bench.patch import _stdout_to_stderr
    from workbench.testing import make_tokenizer

    with _stdout_to_stderr():  # the tokenizer trainer writes to fd 1
        tok = make_tokenizer("llama3")
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it will run: minutes faster for 1B parameters on a GPU
        model = LlamaForCausalLM(cfg)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {**shape, "n_params": n_params}


def _median_times(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Interleaved (rotating order) timings of each function, after one warm-up call each."""
    for f in fns.values():
        f()
        _sync(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            out[k].append(time.perf_counter() - t0)
    return out


def _allocated_mb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_store(model, prompts: list[str], batch_size: int, repeats: int) -> dict:
    """Store (resid_pre, every layer, post-instruction positions) vs a bare forward on the same batches."""
    from workbench.bench.cache import forward_and_store_runs

    device = next(model.parameters()).device
    tmp = Path(tempfile.mkdtemp(prefix="wb-gpu-store-"))
    batches, bare, store = forward_and_store_runs(model, prompts, batch_size, tmp)
    tokens = int(sum(b.attention_mask.sum() for b in batches))

    _reset_peak(device)
    try:
        times = _median_times({"bare_forward": bare, "store": store}, repeats, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "n_prompts": len(prompts), "batch_size": batch_size, "real_tokens": tokens,
        "n_hooks": int(model.cfg.n_layers), "positions": "post_instruction",
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "ratio_store_vs_forward": round(statistics.median(s / b for s, b in zip(times["store"], times["bare_forward"])), 3),
        "peak_gpu_mb": _peak_mb(device),
    }


def bench_generation(model, path: Path, prompts: list[str], max_new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    """WAS-steered generation through the bridge vs plain HF ``generate`` (sdpa and eager) on the same prompts."""
    from transformers import AutoModelForCausalLM

    from workbench.chat import tokenize_chat
    from workbench.generation import eos_ids, generate_batch
    from workbench.steering.controller import Controller, ControllerConfig
    from workbench.steering.steer import controller_plan

    device = next(model.parameters()).device
    n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(d_model=d, n_layers=n, input_layers=list(range(max(0, n - 4), n)),
                                       alpha=1.0)).to(device)
    direction = torch.randn(d)
    plan = controller_plan(ctrl, direction / direction.norm())
    batch = tokenize_chat(model.tokenizer, prompts)
    on_dev = batch.to(device)
    fixed = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    tok = model.tokenizer
    hf = {impl: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).to(device).eval()
          for impl in ("sdpa", "eager")}

    def hf_generate(impl):
        def run():
            with torch.inference_mode():
                hf[impl].generate(input_ids=on_dev.input_ids, attention_mask=on_dev.attention_mask, do_sample=False,
                                  eos_token_id=eos_ids(tok, model), pad_token_id=tok.pad_token_id, **fixed)
        return run

    def steered():
        hooks, _ = plan.hooks_for(model, batch)
        generate_batch(model, batch, fwd_hooks=hooks, **fixed)

    def unsteered():
        generate_batch(model, batch, fwd_hooks=(), **fixed)

    _reset_peak(device)
    times = _median_times({"steered_bridge": steered, "unsteered_bridge": unsteered,
                           "hf_generate_sdpa": hf_generate("sdpa"), "hf_generate_eager": hf_generate("eager")},
                          repeats, device)
    del hf
    med = {k: statistics.median(v) for k, v in times.items()}
    new_tokens = len(prompts) * max_new_tokens

    def ratio(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    return {
        "batch": len(prompts), "max_new_tokens": max_new_tokens, "prompt_tokens": int(batch.input_ids.shape[1]),
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "new_tokens_per_s": {k: round(new_tokens / v, 1) for k, v in med.items()},
        "ratio_steered_vs_hf_generate_sdpa": ratio("steered_bridge", "hf_generate_sdpa"),
        "ratio_steered_vs_hf_generate_eager": ratio("steered_bridge", "hf_generate_eager"),
        "ratio_steered_vs_unsteered_bridge": ratio("steered_bridge", "unsteered_bridge"),
        "peak_gpu_mb": _peak_mb(device),
    }


def bench_patching(model, n_pairs: int, repeats: int) -> dict:
    """The batched resid_pre sweep vs TransformerLens ``get_act_patch_resid_pre`` (same pairs and metric)."""
    from workbench.bench.patch import bench_model, candidate_pairs, same_length_pairs

    device = next(model.parameters()).device
    clean, corrupted = candidate_pairs()
    pairs = same_length_pairs(model.tokenizer, clean, corrupted, n_pairs)
    _reset_peak(device)
    out = bench_model(model, pairs, repeats=repeats)
    out["peak_gpu_mb"] = _peak_mb(device)
    return out


def run_benchmark(device: str = "cuda", dtype: str | None = None, small: bool = False, n_prompts: int = 64,
                  batch_size: int = 16, gen_batch: int = 16, max_new_tokens: int = 32, n_pairs: int = 4,
                  repeats: int = 3, sections: tuple[str, ...] = ("store", "generation", "patching")) -> dict:
    """Build the model, run the chosen sections, return the JSON-able result."""
    from importlib.metadata import version

    import transformers

    from workbench.models import load_model, resolve_dtype
    from workbench.bench.cache import synthetic_prompts

    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    shape = SHAPE_SMALL if small else SHAPE_1B
    result: dict = {
        "benchmark": "benchmarks/gpu.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "transformer_lens": version("transformer-lens"),
                     "python": platform.python_version()},
        "settings": {"small": small, "n_prompts": n_prompts, "batch_size": batch_size, "gen_batch": gen_batch,
                     "max_new_tokens": max_new_tokens, "n_pairs": n_pairs, "repeats": repeats},
    }
    with tempfile.TemporaryDirectory(prefix="wb-gpu-model-") as tmp:
        path = Path(tmp) / ("llama_small" if small else "llama_3.2_1b_shape")
        t0 = time.perf_counter()
        result["model"] = write_random_llama(path, shape, device, torch_dtype)
        model = load_model(str(path), device=device, dtype=torch_dtype)
        result["model"]["seconds_write_and_load"] = round(time.perf_counter() - t0, 1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["model"]["weights_gpu_mb"] = _allocated_mb(dev)
        prompts = synthetic_prompts(n_prompts)
        if "store" in sections:
            result["store"] = bench_store(model, prompts, batch_size, repeats)
        if "generation" in sections:
            result["generation"] = bench_generation(model, path, prompts[:gen_batch], max_new_tokens, repeats,
                                                    torch_dtype)
        if "patching" in sections:
            result["patching"] = bench_patching(model, n_pairs, repeats)
    head = {}
    if "store" in result:
        head["ratio_store_vs_forward"] = result["store"]["ratio_store_vs_forward"]
    if "generation" in result:
        head["steered_tokens_per_s"] = result["generation"]["new_tokens_per_s"]["steered_bridge"]
        head["hf_generate_tokens_per_s"] = result["generation"]["new_tokens_per_s"]["hf_generate_sdpa"]
        head["ratio_steered_vs_hf_generate_sdpa"] = result["generation"]["ratio_steered_vs_hf_generate_sdpa"]
    if "patching" in result:
        head["patching_speedup_vs_transformer_lens"] = result["patching"]["speedup_vs_transformer_lens"]
        head["patching_max_abs_diff_vs_transformer_lens"] = result["patching"]["max_abs_diff_vs_transformer_lens"]
    return {"headline": head, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--small", action="store_true", help="a tiny model shape (smoke test)")
    p.add_argument("--n-prompts", type=int, default=None, help="store prompts (default 64; 16 with --small)")
    p.add_argument("--batch-size", type=int, default=None, help="store batch size (default 16; 8 with --small)")
    p.add_argument("--gen-batch", type=int, default=None, help="prompts generated at once (default 16; 8 with --small)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32; 8 with --small")
    p.add_argument("--n-pairs", type=int, default=None, help="patching pairs (default 4; 2 with --small)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default="store,generation,patching")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available; use --device cpu --small for the smoke test", file=sys.stderr)
        return 2

    def pick(value, big, small):
        return value if value is not None else (small if a.small else big)

    out = run_benchmark(
        device=a.device, dtype=a.dtype, small=a.small, n_prompts=pick(a.n_prompts, 64, 16),
        batch_size=pick(a.batch_size, 16, 8), gen_batch=pick(a.gen_batch, 16, 8),
        max_new_tokens=pick(a.max_new_tokens, 32, 8), n_pairs=pick(a.n_pairs, 4, 2), repeats=a.repeats,
        sections=tuple(s.strip() for s in a.sections.split(",") if s.strip()),
    )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
