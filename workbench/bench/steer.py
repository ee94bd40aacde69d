"""``workbench bench steer``: steered vs unsteered generation, batched vs per-prompt, and the official Guiding
Giants per-prompt loop (:mod:`.official_loop`, the peer) on the same prompts, in one process.

Every run generates exactly ``max_new_tokens`` tokens (``min_new_tokens`` pins the length), so the timings
compare the same work. The steered run includes the controller's clean prefill (whose keys and values the steered
generation continues from: :func:`workbench.steering.steer.steered_generation_inputs`). The steering is that of a freshly
initialised (untrained) :class:`Controller` reading the last 4 layers and a random unit direction, so it runs on
any model: the timing is measured, not the behaviour. ``--model NAME`` runs on that model only (any name
:func:`workbench.load_model` accepts), on short real prompts (:mod:`workbench.bench.prompts`).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..chat import tokenize_chat
from ..directions.artifact import unit
from ..generation import generate_batch
from ..hf_hooks import plain_model
from ..steering.controller import Controller, ControllerConfig
from ..steering.official import OfficialConfig, official_controller_config
from ..steering.steer import controller_plan, steered_generation_inputs
from .official_loop import official_loop


def _time_interleaved(fns, repeats: int, warm_up: bool = True) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``repeats`` times (A B C A B C ...), so that a drift of the
    machine's speed during the measurement (shared cores, clock changes) falls on all of them alike."""
    if warm_up:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def bench_steer_model(model, prompts: list[str], max_new_tokens: int = 24, repeats: int = 3,
                      per_prompt_repeats: int = 1) -> dict:
    """Timings on one model: batched and per-prompt unsteered, batched steered, per-prompt steered, the official
    method batched and per prompt, and the official loop (same prompts); the ``ceiling_*`` ratios are what batching
    gives without any steering, the bound of the steered speedups on this machine."""
    n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    torch.manual_seed(0)
    cfg = ControllerConfig(d_model=d, n_layers=n, input_layers=list(range(max(0, n - 4), n)), alpha=1.0)
    ctrl = Controller(cfg)
    direction = torch.randn(d)
    plan = controller_plan(ctrl, unit(direction))
    fixed = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    batch = tokenize_chat(model.tokenizer, prompts)

    singles = [tokenize_chat(model.tokenizer, [p]) for p in prompts]

    def run(steering, batches):
        """Generate ``batches`` under ``steering`` (a plan, or ``None``: unsteered), as ``evaluate_refusal`` does."""
        def go():
            for b in batches:
                b, hooks, _, extra = steered_generation_inputs(model, b, steering)
                generate_batch(model, b, fwd_hooks=hooks, **fixed, **extra)
        return go

    # the official method (per-step controller, final-layer patch) through the workbench, and its peer loop
    ocfg = official_controller_config(model, OfficialConfig(n_input_layers=min(4, n)))   # 4 unless fewer layers
    torch.manual_seed(0)
    octrl = Controller(ocfg).eval()
    oplan = controller_plan(octrl, unit(direction), "official")
    hf = plain_model(model)

    def official_peer():
        official_loop(hf, model.tokenizer, prompts, octrl, unit(direction), max_new_tokens, scale=ocfg.alpha)

    t_un, t_st, t_ob = _time_interleaved([run(None, [batch]), run(plan, [batch]), run(oplan, [batch])], repeats)
    # the per-prompt runs are long: their warm-up is the batched runs' (same prompts, same plans)
    t_upp, t_pp, t_op, t_peer = _time_interleaved([run(None, singles), run(plan, singles), run(oplan, singles),
                                                   official_peer], per_prompt_repeats, warm_up=False)
    return {
        "batch": len(prompts), "max_new_tokens": max_new_tokens,
        "seconds": {"unsteered_batched": round(t_un, 4), "steered_batched": round(t_st, 4),
                    "unsteered_per_prompt": round(t_upp, 4),
                    "steered_per_prompt": round(t_pp, 4), "official_batched": round(t_ob, 4),
                    "official_per_prompt": round(t_op, 4), "official_loop_peer": round(t_peer, 4)},
        "ratio_steered_vs_unsteered": round(t_st / t_un, 3),
        "ratio_official_steered_vs_unsteered": round(t_ob / t_un, 3),
        "speedup_batched_vs_per_prompt": round(t_pp / t_st, 2),
        # goals of the steering-evaluation issue: per-prompt >= 1x the official loop, batched >= 10x
        "speedup_per_prompt_vs_official_loop": round(t_peer / t_op, 3),
        "speedup_batched_vs_official_loop": round(t_peer / t_ob, 2),
        # what batching alone gives on this machine, no steering at all: the ceiling of the two speedups above
        # (a steered batch cannot run faster than an unsteered one)
        "ceiling_unsteered_batched_vs_per_prompt": round(t_upp / t_un, 2),
        "ceiling_unsteered_batched_vs_official_loop": round(t_peer / t_un, 2),
        "steering": {"plan": "controller_plan: coefficients s*w*alpha on resid_pre of every layer",
                     "controller": f"freshly initialised (untrained, torch seed 0), input {cfg.input_hook} of layers "
                                   f"{cfg.input_layers}, pooling {cfg.pooling}, alpha {cfg.alpha}",
                     "direction": "random unit vector (torch seed 0)"},
    }


#: the ratios repeated at the top of the JSON (of the organism, else the first model)
HEADLINE = ("ratio_steered_vs_unsteered", "ratio_official_steered_vs_unsteered", "speedup_batched_vs_per_prompt",
            "speedup_per_prompt_vs_official_loop", "speedup_batched_vs_official_loop")


def _word_prompts(n: int) -> list[str]:
    """``n`` short synthetic prompts (the random Llama's)."""
    words = "How do I bake bread write a poem about the sea explain hack into bank account".split()
    return [" ".join(words[i % 7: i % 7 + 4 + i % 5]) + "?" for i in range(n)]


def bench_steer(batch: int = 32, max_new_tokens: int = 24, repeats: int = 3, random_model: bool = True,
                model: str | None = None) -> dict:
    """The benchmark JSON: the organism (when present) and a random d_model 512 / 8-layer Llama; ``model``:
    instead, only that model (any name :func:`workbench.load_model` accepts), named by ``model`` in the JSON, on
    short real prompts (``prompts`` says which, or the fallback to synthetic ones)."""
    from ..data import organism_prompts
    from ..models import load_model
    from ..testing import make_tiny_chat_model

    if model is not None:
        from .prompts import model_prompts

        prompts, source = model_prompts(batch, _word_prompts)
        res = bench_steer_model(load_model(model, device="cpu"), prompts, max_new_tokens, repeats)
        return {"model": model, **{k: res[k] for k in HEADLINE}, "models": {model: res}, "prompts": source}
    out = {}
    try:
        organism = load_model("organism", device="cpu")
        prompts = (organism_prompts("test", "harmful") + organism_prompts("test", "benign"))[:batch]
        out["organism"] = bench_steer_model(organism, prompts, max_new_tokens, repeats)
    except Exception as exc:  # noqa: BLE001 - the organism may not be built on this checkout
        out["organism"] = {"skipped": str(exc)}
    if random_model:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_tiny_chat_model(tmp + "/m", family="llama3", d_model=512, n_layers=8, n_heads=8,
                                        n_kv_heads=4, d_mlp=1376)
            llama = load_model(str(path), device="cpu")
            out["random_llama_512x8"] = bench_steer_model(llama, _word_prompts(batch), max_new_tokens, repeats)
    head = out.get("organism", {})
    if "ratio_steered_vs_unsteered" not in head:
        head = out.get("random_llama_512x8", {})
    return {**{k: head.get(k) for k in HEADLINE}, "models": out}
