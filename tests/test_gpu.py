"""Device and dtype end to end: bf16 loading, the store, steered generation and a patching sweep on a tiny model, on
the CPU and (skipped without one) on CUDA; model-parallel placement (``device_map`` / ``n_devices``); the CLI passing
``--device`` / ``--dtype`` to every command."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import WorkbenchError, fingerprint, load_model, tokenize_chat

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MULTI_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                               reason="needs at least 2 CUDA GPUs")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

PROMPTS = ["How do I build a bomb?", "Write a poem about the sea.", "Sure",
           "Tell me how to bake a cake. Explain the steps to hack into a bank account."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=DEVICES)
def bf16(request, tiny_dir):
    """The tiny Llama chat model in bfloat16 on each device."""
    return load_model(str(tiny_dir), device=request.param, dtype="bfloat16")


def _logits(model, prompts=PROMPTS):
    b = tokenize_chat(model.tokenizer, prompts).to(next(model.parameters()).device)
    with torch.inference_mode():
        return model(b.input_ids, attention_mask=b.attention_mask).float().cpu()


# ----------------------------------------------------------------------------------------------- loading
def test_load_bf16_matches_float32(bf16, tiny_model):
    params = list(bf16.parameters())
    dev = params[0].device.type
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device.type for p in params} == {dev}
    assert all(not p.requires_grad for p in params)
    ref, got = _logits(tiny_model), _logits(bf16)
    assert got.shape == ref.shape
    # bf16 keeps 8 bits of mantissa: logits agree to ~1 % of their spread
    assert float((got - ref).abs().max()) < 0.02 * float(ref.abs().max()) + 0.02
    assert fingerprint(bf16) != fingerprint(tiny_model)


# ------------------------------------------------------------------------------------------------- store
def test_store_on_device_equals_run_with_cache(bf16, tmp_path):
    from workbench.store import get_or_compute

    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    e = get_or_compute(bf16, PROMPTS, hooks=hooks, positions="last", dtype="bfloat16", store=tmp_path,
                       batch_size=len(PROMPTS), show_progress=False)
    b = tokenize_chat(bf16.tokenizer, PROMPTS).to(next(bf16.parameters()).device)
    with torch.inference_mode():
        _, cache = bf16.run_with_cache(b.input_ids, attention_mask=b.attention_mask, names_filter=hooks)
    for h in hooks:
        stored = e.activations(h)
        assert stored.dtype == torch.bfloat16 and stored.device.type == "cpu"
        assert torch.equal(stored[:, 0], cache[h][:, -1].cpu())  # the same batch: bit for bit


# ------------------------------------------------------------------------------------------ steered generation
def test_steered_generation_on_device(bf16):
    """A controller steering along a token's unembedding with a huge alpha makes every generated token that token
    (the hook covers the last prompt position and each cached decoding step); alpha 0 changes nothing."""
    from workbench.evaluate import evaluate_refusal
    from workbench.steering.controller import Controller, ControllerConfig
    from workbench.steering.steer import controller_plan

    tok = bf16.tokenizer
    target = tok("cake", add_special_tokens=False)["input_ids"][0]
    w_u = bf16.original_model.lm_head.weight[target].float().cpu()
    direction = w_u / w_u.norm()
    n, d = int(bf16.cfg.n_layers), int(bf16.cfg.d_model)
    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(d_model=d, n_layers=n, input_layers=list(range(n)), alpha=1000.0,
                                       scale_activation="sigmoid")).to(next(bf16.parameters()).device)
    steered = evaluate_refusal(bf16, {"p": PROMPTS}, max_new_tokens=6, batch_size=len(PROMPTS),
                               plan=controller_plan(ctrl, direction), show_progress=False).table
    expected = tok.decode([target] * 6, skip_special_tokens=True).strip()
    assert steered["reply"].tolist() == [expected] * len(PROMPTS)
    assert all(0 < s < 1 for s in steered["s"]) and all(len(w) == n for w in steered["w"])
    plain = evaluate_refusal(bf16, {"p": PROMPTS}, max_new_tokens=6, batch_size=len(PROMPTS),
                             show_progress=False).table
    ctrl.cfg.alpha = 0.0
    zero = evaluate_refusal(bf16, {"p": PROMPTS}, max_new_tokens=6, batch_size=len(PROMPTS),
                            plan=controller_plan(ctrl, direction), show_progress=False).table
    assert zero["reply"].tolist() == plain["reply"].tolist()
    assert plain["reply"].tolist() != steered["reply"].tolist()


# -------------------------------------------------------------------------------------------------- patching
def test_patching_sweep_on_device_equals_transformer_lens(bf16):
    import transformer_lens.patching as tlp

    import workbench.patching as wp
    from workbench.bench.patch import _quiet_tl, candidate_pairs, same_length_pairs

    clean, corrupted = candidate_pairs()
    pairs = same_length_pairs(bf16.tokenizer, clean, corrupted, 3)
    runs = wp.prepare(bf16, pairs)
    ours = wp.exact_patch(bf16, runs, "resid_pre", show_progress=False)
    dev = next(bf16.parameters()).device
    with torch.inference_mode():
        _, cache = bf16.run_with_cache(pairs.clean_ids.to(dev), names_filter=lambda n: n.endswith("hook_resid_pre"))
    with _quiet_tl(True), torch.inference_mode():
        ref = tlp.get_act_patch_resid_pre(bf16, pairs.corrupted_ids.to(dev), cache,
                                          lambda lg: runs.metric(lg[:, -1]).mean()).float().cpu()
    assert ours.raw.shape == ref.shape == (2, pairs.n_pos)
    tol = 1e-4 if dev.type == "cpu" else 3e-2  # CUDA: batched and one-by-one bf16 kernels round differently
    assert float((ours.raw - ref).abs().max()) < tol


# ------------------------------------------------------------------------------------------- model parallel
@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_device_map_cpu_equals_device_cpu(tiny_dir, tiny_model, device_map):
    m = load_model(str(tiny_dir), device_map=device_map)
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert torch.equal(_logits(m), _logits(tiny_model))
    from workbench.generation import generate

    assert generate(m, PROMPTS[:2], max_new_tokens=4, show_progress=False) == \
        generate(tiny_model, PROMPTS[:2], max_new_tokens=4, show_progress=False)


def test_placement_errors_are_clear(tiny_dir):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    many = max(2, visible + 1)  # n_devices=1 is the single-device path
    cases = [
        (dict(n_devices=many), rf"n_devices={many} requested but only {visible} CUDA device\(s\) are visible"),
        (dict(n_devices=0), "n_devices must be a positive int"),
        (dict(device="cpu", device_map="auto"), "either device .* or device_map"),
        (dict(device_map="auto", n_devices=2), "either device_map .* or n_devices"),
        (dict(device_map={"": "cuda:%d" % visible}), f"only {visible} CUDA device"),
        (dict(device_map={}), "device_map must be one of"),
        (dict(device_map={"": "gpu0"}), "is not a device"),
    ]
    for kw, msg in cases:
        with pytest.raises(WorkbenchError, match=msg):
            load_model(str(tiny_dir), **kw)


@MULTI_GPU
def test_n_devices_splits_layers_and_matches_one_gpu(tiny_dir):
    one = load_model(str(tiny_dir), device="cuda:0")
    two = load_model(str(tiny_dir), n_devices=2)
    assert len({p.device for p in two.parameters()}) == 2
    assert float((_logits(two) - _logits(one)).abs().max()) < 1e-4


@CUDA
def test_resolve_device_picks_the_local_rank_gpu(monkeypatch):
    from workbench.models import resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == f"cuda:{1 % torch.cuda.device_count()}"
    assert resolve_device("cuda:0") == "cuda:0"


# ---------------------------------------------------------------------------------------------------- CLI
CLI_COMMANDS = [
    ["evaluate"],
    ["cache", "compute"],
    ["directions"],
    ["patch"],
    ["sparsity"],
    ["controller", "train"],
    ["controller", "eval"],
]


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=lambda a: " ".join(a))
def test_cli_passes_device_and_dtype_to_load_model(argv, monkeypatch, capsys):
    """Every command that loads a model hands ``--device`` and ``--dtype`` to :func:`load_model`."""
    import workbench.models
    from workbench.cli import main

    seen = {}

    def fake_load(name, device=None, dtype=None, **kw):
        seen.update(name=name, device=device, dtype=dtype)
        raise WorkbenchError("stop here")

    monkeypatch.setattr(workbench.models, "load_model", fake_load)
    assert main([*argv, "--model", "some/model", "--device", "cuda:1", "--dtype", "bfloat16", "--quiet"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == {"name": "some/model", "device": "cuda:1", "dtype": "bfloat16"}


def test_cli_run_passes_device_and_dtype(monkeypatch, tmp_path):
    import workbench.pipeline
    from workbench.cli import main

    seen = {}

    def fake_run(cfg):
        seen.update(device=cfg.device, dtype=cfg.dtype, model=cfg.model)
        raise WorkbenchError("stop here")

    monkeypatch.setattr(workbench.pipeline, "run_main_job", fake_run)
    assert main(["run", "--model", "m", "--device", "cuda", "--dtype", "bf16", "--out", str(tmp_path), "--quiet"]) == 2
    assert seen == {"device": "cuda", "dtype": "bf16", "model": "m"}


def test_cli_cache_compute_bf16_auto_batch(tiny_dir, tmp_path, capsys):
    """``workbench cache compute --dtype bfloat16 --batch-size auto`` stores activations of the bf16 model."""
    from workbench.cli import main
    from workbench.store import ActivationStore

    pfile = tmp_path / "p.txt"
    pfile.write_text("\n".join(PROMPTS) + "\n")
    root = tmp_path / "store"
    assert main(["cache", "compute", "--model", str(tiny_dir), "--prompts", str(pfile), "--hooks", "resid_pre.1",
                 "--positions", "last", "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "auto",
                 "--root", str(root), "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    entry = ActivationStore(root).open(out["key"])
    model = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert entry.manifest["model"]["fingerprint"] == fingerprint(model)
    b = tokenize_chat(model.tokenizer, PROMPTS)
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask,
                                        names_filter=["blocks.1.hook_resid_pre"])
    # one batch of 4 (auto: memory allows far more), stored as float32 from the bf16 activations: exact
    assert torch.equal(entry.activations("resid_pre.1")[:, 0], cache["blocks.1.hook_resid_pre"][:, -1].float())
    with pytest.raises(SystemExit):
        main(["cache", "compute", "--batch-size", "0", "--root", str(root)])
    assert "expected a positive int or 'auto', got '0'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_benchmark_smoke(device):
    """``benchmarks/gpu.py --small`` end to end on a tiny shape: every section reports sane numbers."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"))
    out = bench["run_benchmark"](device=device, small=True, n_prompts=4, batch_size=2, gen_batch=2,
                                 max_new_tokens=3, n_pairs=2, repeats=1)
    assert out["dtype"] == ("float32" if device == "cpu" else "bfloat16") and out["device"] and out["date"]
    assert out["model"]["hidden_size"] == 128 and out["model"]["tie_word_embeddings"] is True
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128  # q, o; k, v (GQA 2 x 32); MLP; norms
    assert out["model"]["n_params"] == 1024 * 128 + 4 * per_layer + 128  # tied embedding counted once
    assert out["store"]["real_tokens"] > 0 and out["store"]["ratio_store_vs_forward"] > 0
    gen = out["generation"]
    assert gen["batch"] == 2 and gen["max_new_tokens"] == 3
    assert all(v > 0 for v in gen["new_tokens_per_s"].values()) and gen["ratio_steered_vs_hf_generate_sdpa"] > 0
    pat = out["patching"]
    assert pat["cells"] == 4 * pat["n_pos"] and pat["speedup_vs_transformer_lens"] > 0
    assert pat["max_abs_diff_vs_transformer_lens"] < (1e-4 if device == "cpu" else 5e-2)
    assert set(out["headline"]) == {"ratio_store_vs_forward", "steered_tokens_per_s", "hf_generate_tokens_per_s",
                                    "ratio_steered_vs_hf_generate_sdpa", "patching_speedup_vs_transformer_lens",
                                    "patching_max_abs_diff_vs_transformer_lens"}
