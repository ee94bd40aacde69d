"""``workbench bench cache|patch|steer`` on a named model (``--model NAME`` / ``--models NAME``): a tiny random
chat model stands in for a real one, at the smallest sizes (2-4 prompts, 1 repeat)."""

import math

import pytest

from workbench.errors import WorkbenchError


def _positive(out: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(out[k], (int, float)) and math.isfinite(out[k]) and out[k] > 0, (k, out[k])


def _prompts_record(rec: dict) -> None:
    assert rec["source"].startswith("real:") or "fallback" in rec, rec


def test_bench_cache_named_model(tiny_dir):
    from workbench.bench.cache import run_benchmark

    name = str(tiny_dir)
    out = run_benchmark(n_prompts=4, batch_size=2, repeats=1, rss_prompts=2, model=name)
    assert out["model"] == name and list(out["models"]) == [name]
    _positive(out, "ratio_store_vs_forward", "ratio_tl_cache_all_vs_forward", "ratio_tl_cache_filtered_vs_forward")
    assert out["ratio_store_vs_forward"] == out["models"][name]["ratio_store_vs_forward"]
    assert out["models"][name]["n_prompts"] == 4
    assert out["rss_mb"]["1x"] > 0 and out["rss_mb"]["4x"] > 0 and out["rss_mb"]["detail"]["4x"]["n_prompts"] == 8
    _prompts_record(out["prompts"])


def test_bench_patch_named_model(tiny_dir):
    from workbench.bench.patch import bench_patch

    name = str(tiny_dir)
    out = bench_patch((name,), n_pairs=2, repeats=1)
    assert list(out["models"]) == [name] and "skipped" not in out
    run = out["models"][name]
    _positive(out, "speedup_vs_transformer_lens")
    _positive(run, "speedup_vs_transformer_lens", "seconds_ours", "seconds_transformer_lens")
    assert math.isfinite(out["max_abs_diff_vs_transformer_lens"]) and out["max_abs_diff_vs_transformer_lens"] < 1e-3
    assert 1 <= run["n_pairs"] <= 2
    _prompts_record(run["pairs"])


def test_bench_steer_named_model(tiny_dir):
    from workbench.bench.steer import bench_steer

    name = str(tiny_dir)
    out = bench_steer(batch=3, max_new_tokens=2, repeats=1, model=name)
    assert out["model"] == name and list(out["models"]) == [name]
    _positive(out, "ratio_steered_vs_unsteered", "speedup_batched_vs_per_prompt")
    run = out["models"][name]
    assert run["batch"] == 3 and "random unit vector" in run["steering"]["direction"]
    sec = run["seconds"]
    # (the seconds are rounded to 4 decimals, the ratios computed before rounding)
    assert run["ceiling_unsteered_batched_vs_per_prompt"] == pytest.approx(
        sec["unsteered_per_prompt"] / sec["unsteered_batched"], rel=0.02)
    assert run["ceiling_unsteered_batched_vs_official_loop"] == pytest.approx(
        sec["official_loop_peer"] / sec["unsteered_batched"], rel=0.02)
    _prompts_record(out["prompts"])


def test_bench_prompts_fall_back_without_real_data(monkeypatch):
    """Without the real data files the named-model benchmarks use their synthetic prompts and say so; the parser
    takes --model on bench cache and bench steer."""
    import workbench.promptsets
    from workbench.bench.cache import synthetic_prompts
    from workbench.bench.prompts import model_prompts
    from workbench.cli import build_parser

    def missing(*a, **k):
        raise WorkbenchError("real data not fetched")

    monkeypatch.setattr(workbench.promptsets, "load_data", missing)
    prompts, rec = model_prompts(3, synthetic_prompts)
    assert prompts == synthetic_prompts(3) and rec["source"] == "synthetic prompts"
    assert "real data not fetched" in rec["fallback"]
    parser = build_parser()
    for cmd in ("cache", "steer"):
        assert parser.parse_args(["bench", cmd, "--model", "smollm2-135m-instruct"]).model == "smollm2-135m-instruct"
        assert parser.parse_args(["bench", cmd]).model is None


def test_bench_real_prompts_alternate():
    from workbench.bench.prompts import model_prompts, real_prompts

    try:
        harmful, benign = real_prompts()
    except WorkbenchError:
        pytest.skip("the real prompt data is not fetched")
    prompts, rec = model_prompts(5, lambda k: [])
    assert prompts == [harmful[0], benign[0], harmful[1], benign[1], harmful[2]]
    assert (rec["harmful"], rec["benign"]) == (3, 2)
