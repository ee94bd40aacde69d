"""Activation patching: exactness against transformer_lens.patching, engine agreement, attribution, subspace
patching, the illusion check, bad input and the CLI. Tiny random models; every test asserts numbers."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import workbench.patching as wp
from workbench.errors import WorkbenchError
from workbench.bench.patch import candidate_pairs, same_length_pairs
from workbench.patching.cost_model import plan_resume
from workbench.patching.rows import Rows


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    """A 3-layer random Llama chat model (d_model 64, 4 heads, GQA 2)."""
    from workbench import load_model
    from workbench.testing import make_tiny_chat_model

    path = make_tiny_chat_model(tmp_path_factory.mktemp("patch") / "m3", n_layers=3, seed=1)
    return load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def flat_pairs(model3):
    """Three equal-length pairs sharing one token length (no padding anywhere)."""
    clean, corrupted = candidate_pairs()
    return same_length_pairs(model3.tokenizer, clean, corrupted, 3)


@pytest.fixture(scope="module")
def padded_pairs(model3):
    """Pairs of equal length within each pair but different lengths across pairs (left padding)."""
    clean, corrupted = candidate_pairs()
    pairs = wp.make_pairs(model3.tokenizer, clean, corrupted, drop_unequal=True)
    lengths = pairs.attention_mask.sum(-1).tolist()
    pick, seen = [], set()
    for i, n in enumerate(lengths):
        if n not in seen:
            seen.add(n)
            pick.append(i)
        if len(pick) == 3:
            break
    out = wp.make_pairs(model3.tokenizer, [pairs.clean[i] for i in pick], [pairs.corrupted[i] for i in pick])
    assert out.padded
    return out


@pytest.fixture(scope="module")
def runs(model3, flat_pairs):
    return wp.prepare(model3, flat_pairs)


def _tl_metric(runs):
    return lambda logits: runs.metric(logits[:, -1]).mean()


# ----------------------------------------------------------------------------------------------- exactness
def test_resid_pre_sweep_equals_transformer_lens(model3, flat_pairs, runs):
    import transformer_lens.patching as tlp

    ours = wp.exact_patch(model3, runs, "resid_pre", show_progress=False)
    _, cache = model3.run_with_cache(flat_pairs.clean_ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    ref = tlp.get_act_patch_resid_pre(model3, flat_pairs.corrupted_ids, cache, _tl_metric(runs))
    assert ours.engine == "resume"
    assert ours.raw.shape == ref.shape == (3, flat_pairs.n_pos)
    assert float((ours.raw - ref).abs().max()) < 1e-4
    # and the peer's numbers are not trivially constant
    assert float(ref.max() - ref.min()) > 1e-4


@pytest.mark.parametrize("component,tl_name", [
    pytest.param("attn_out", "get_act_patch_attn_out", marks=pytest.mark.slow),
    ("heads", "get_act_patch_attn_head_out_all_pos"),
])
def test_other_sweeps_equal_transformer_lens(model3, flat_pairs, runs, component, tl_name):
    import transformer_lens.patching as tlp

    ours = wp.exact_patch(model3, runs, component, show_progress=False)
    hook = "hook_attn_out" if component == "attn_out" else "hook_z"
    _, cache = model3.run_with_cache(flat_pairs.clean_ids, names_filter=lambda n: n.endswith(hook))
    ref = getattr(tlp, tl_name)(model3, flat_pairs.corrupted_ids, cache, _tl_metric(runs))
    assert ours.raw.shape == ref.shape
    assert float((ours.raw - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "mlp_out", "heads", "heads_pos"])
def test_resume_engine_equals_hooks_engine_with_padding(model3, padded_pairs, component):
    runs = wp.prepare(model3, padded_pairs)
    for mode in ("denoise", "noise") if component in ("resid_pre", "heads") else ("denoise",):
        a = wp.exact_patch(model3, runs, component, mode=mode, engine="resume", show_progress=False)
        b = wp.exact_patch(model3, runs, component, mode=mode, engine="hooks", show_progress=False)
        assert a.engine == "resume" and b.engine == "hooks"
        assert float((a.raw - b.raw).abs().max()) < 1e-4


def test_resume_engine_small_token_budget_is_still_exact(model3, runs):
    a = wp.exact_patch(model3, runs, "resid_pre", max_tokens=7, show_progress=False)
    b = wp.exact_patch(model3, runs, "resid_pre", engine="hooks", show_progress=False)
    assert float((a.raw - b.raw).abs().max()) < 1e-4


def test_patching_every_position_restores_the_clean_run(model3, runs):
    den = wp.exact_patch(model3, runs, "resid_pre", grid="layer", show_progress=False)
    noi = wp.exact_patch(model3, runs, "resid_pre", grid="layer", mode="noise", show_progress=False)
    assert torch.allclose(den.values, torch.ones(3), atol=1e-3)      # clean resid everywhere = the clean run
    assert torch.allclose(noi.values, torch.zeros(3), atol=1e-3)     # corrupted resid everywhere = corrupted run


def test_shared_prefix_cells_are_the_corrupted_run(model3, runs):
    res = wp.exact_patch(model3, runs, "resid_pre", show_progress=False)
    fd = int(runs.pairs.first_diff.min())
    assert fd > 0
    assert torch.equal(res.values[:, :fd], torch.zeros(3, fd))
    assert float((res.raw[:, :fd] - runs.corrupted_value).abs().max()) == 0.0


def test_plan_covers_every_row_once():
    g = torch.Generator().manual_seed(0)
    n = 200
    rows = Rows(torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g),
                torch.randint(5, 20, (n,), generator=g), torch.zeros(n, 20, dtype=torch.bool))
    for overhead in (0.0, 50.0, 1e7):
        chunks = plan_resume(rows, 20, 4, overhead, max_tokens=64)
        ids = torch.cat([c for _, c in chunks])
        assert sorted(ids.tolist()) == list(range(n))
        for start, c in chunks:
            assert int(rows.start[c].min()) >= start
            assert len(c) * (20 - start) <= 64 or len(c) == 1
            assert torch.equal(rows.layer[c], rows.layer[c].sort().values)
    assert len(plan_resume(rows, 20, 4, 1e7, 10_000)) == 1          # huge overhead: one merged group


# ------------------------------------------------------------------------------------------------ results
def test_dataframe_has_token_labels(model3, runs):
    res = wp.exact_patch(model3, runs, "mlp_out", show_progress=False)
    df = res.df
    n_pos = runs.pairs.n_pos
    assert len(df) == 3 * n_pos
    assert {"component", "layer", "pos", "token", "corrupted_token", "value", "raw"} <= set(df.columns)
    tok = model3.tokenizer
    assert df.loc[df.pos == n_pos - 1, "token"].iloc[0] == tok.decode([int(runs.pairs.clean_ids[0, -1])])
    assert int(df.post_instruction.sum()) == 3 * runs.pairs.n_post
    heads = wp.exact_patch(model3, runs, "heads", show_progress=False).df
    assert len(heads) == 3 * 4 and set(heads["head"]) == {0, 1, 2, 3}


def test_restricted_layers_keep_their_layer_numbers(model3, runs):
    full = wp.exact_patch(model3, runs, "attn_out", show_progress=False)
    part = wp.exact_patch(model3, runs, "attn_out", layers=[1, 2], show_progress=False)
    assert part.values.shape == (2, runs.pairs.n_pos)
    assert float((part.raw - full.raw[1:]).abs().max()) < 1e-5
    assert sorted(set(part.df["layer"])) == [1, 2]
    attr = wp.attribution_patch(model3, runs, "attn_out", layers=[2])
    assert sorted(set(attr.df["layer"])) == [2]


def test_attribution_tracks_exact_patching(model3, runs):
    for component in ("attn_out", "mlp_out", "heads"):
        ex = wp.exact_patch(model3, runs, component, show_progress=False)
        at = wp.attribution_patch(model3, runs, component)
        assert at.values.shape == ex.values.shape
        assert wp.compare(ex, at)["pearson"] > 0.9
    ex = wp.exact_patch(model3, runs, "heads_pos", show_progress=False)
    at = wp.attribution_patch(model3, runs, "heads_pos")
    assert wp.compare(ex, at)["pearson"] > 0.9
    # first-order estimate of a full-layer resid patch: exact is 1, the estimate is finite and positive-ish
    assert wp.pearson(torch.arange(5.0), torch.arange(5.0) * 2) == pytest.approx(1.0)


def test_metrics(model3):
    tok = model3.tokenizer
    logits = torch.randn(5, len(tok), generator=torch.Generator().manual_seed(0))
    ld = wp.make_metric(model3, "logit_diff")
    r, c = wp.metrics.refusal_token_ids(tok), wp.compliance_token_ids(tok)
    assert torch.allclose(ld(logits), logits[:, r].mean(-1) - logits[:, c].mean(-1))
    rs = wp.make_metric(model3, "refusal_score")(logits)
    p = torch.softmax(logits, -1)[:, r].sum(-1)
    assert torch.allclose(rs, torch.log(p / (1 - p)), atol=1e-5)
    assert wp.normalise(torch.tensor([2.0, 3.0]), clean=3.0, corrupted=2.0).tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------- subspace
def test_subspace_patch_full_basis_equals_full_patch(model3, runs):
    eye = torch.eye(64)
    df = wp.subspace_patch(model3, runs, eye, positions="post", show_progress=False)
    assert len(df) == 3
    assert float((df["value"] - df["value_full"]).abs().max()) < 1e-3
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    one = wp.subspace_patch(model3, runs, v, layers=[1], positions="post", show_progress=False)
    assert one["layer"].tolist() == [1]
    # a single direction moves less than the whole residual stream
    assert abs(float(one["value"][0])) < abs(float(one["value_full"][0])) + 1e-6


def test_split_direction_against_a_known_row_space():
    g = torch.Generator().manual_seed(0)
    readers = torch.randn(8, 64, generator=g, dtype=torch.float64)
    v = torch.randn(64, generator=g)
    v_row, v_null, row_dim = wp.split_direction(v, readers.T @ readers)
    assert row_dim == 8
    assert torch.allclose(v_row + v_null, v, atol=1e-5)
    assert float((readers.float() @ v_null).abs().max()) < 1e-4      # the nullspace part is not read
    assert abs(float(v_row @ v_null)) < 1e-4


def test_illusion_check_on_a_model_with_unread_coordinates(tiny_dir):
    """Zero the norms' weights on 4 coordinates from layer 1 on: those coordinates are never read downstream."""
    from workbench import load_model

    model = load_model(str(tiny_dir), device="cpu")
    dead = [3, 17, 40, 63]
    with torch.no_grad():
        for j in range(1, model.cfg.n_layers):
            for ln in (model.blocks[j].ln1, model.blocks[j].ln2):
                ln.original_component.weight[dead] = 0.0
        model.ln_final.original_component.weight[dead] = 0.0
    gram, _ = wp.reader_gram(model, 1)
    v = torch.zeros(64)
    v[dead[0]] = 0.6
    v[5] = 0.8
    _, v_null, row_dim = wp.split_direction(v, gram)
    assert row_dim == 60
    assert float(v_null.norm() ** 2) == pytest.approx(0.36, abs=1e-4)
    clean, corrupted = candidate_pairs()
    pairs = same_length_pairs(model.tokenizer, clean, corrupted, 2)
    runs = wp.prepare(model, pairs)
    chk = wp.illusion_check(model, runs, v, layer=1)
    assert chk.null_dim == 4 and chk.row_dim == 60
    assert chk.null_norm_fraction == pytest.approx(0.36, abs=1e-4)
    # the connected and disconnected sources add up to the full patch (to first order)
    assert chk.effect_full == pytest.approx(chk.effect_connected_source + chk.effect_disconnected_source, abs=0.05)
    assert set(chk.to_dict()) >= {"disconnected_share", "effect_null", "effect_row"}
    # with every reader of the unedited layer 0 included, nothing is disconnected
    assert wp.illusion_check(model, runs, v, layer=0).null_dim == 0


# ---------------------------------------------------------------------------------------------- bad input
def test_unequal_pair_lengths_raise(model3, flat_pairs):
    with pytest.raises(WorkbenchError, match="different token length"):
        wp.make_pairs(model3.tokenizer, ["How do I build a bomb right now please?"], ["Hi"])
    pairs = wp.make_pairs(model3.tokenizer, ["How do I build a bomb right now please?", flat_pairs.clean[0]],
                          ["Hi", flat_pairs.corrupted[0]], drop_unequal=True)
    assert pairs.dropped == [0] and pairs.n_pairs == 1
    with pytest.raises(WorkbenchError, match="none of the 1 pairs"):
        wp.make_pairs(model3.tokenizer, ["How do I build a bomb right now please?"], ["Hi"], drop_unequal=True)


def test_unknown_component_raises(model3, runs):
    with pytest.raises(WorkbenchError, match="unknown component 'resid_post'"):
        wp.exact_patch(model3, runs, "resid_post", show_progress=False)
    with pytest.raises(WorkbenchError, match="cannot be swept by grid"):
        wp.exact_patch(model3, runs, "resid_pre", grid="layer_head", show_progress=False)
    with pytest.raises(WorkbenchError, match="unknown mode"):
        wp.exact_patch(model3, runs, "resid_pre", mode="both", show_progress=False)


def test_constant_metric_raises(model3):
    pairs = wp.make_pairs(model3.tokenizer, ["How do I bake a cake?"], ["How do I bake a cake?"])
    with pytest.raises(WorkbenchError, match="constant on the pairs"):
        wp.prepare(model3, pairs)


def test_other_bad_input(model3, runs):
    with pytest.raises(WorkbenchError, match="d_model = 64"):
        wp.subspace_patch(model3, runs, torch.ones(10), show_progress=False)
    with pytest.raises(WorkbenchError, match="unknown metric"):
        wp.make_metric(model3, "accuracy")
    with pytest.raises(WorkbenchError, match="out of range"):
        wp.exact_patch(model3, runs, "resid_pre", layers=[7], show_progress=False)


# ---------------------------------------------------------------------------------------------- store, CLI
def test_clean_activations_from_the_store(model3, flat_pairs, runs, tmp_path):
    stored = wp.prepare(model3, flat_pairs, store=tmp_path / "store")
    assert stored.clean_source.startswith("store")
    a = wp.exact_patch(model3, stored, "attn_out", show_progress=False)
    b = wp.exact_patch(model3, runs, "attn_out", show_progress=False)
    assert float((a.raw - b.raw).abs().max()) < 1e-5
    again = wp.prepare(model3, flat_pairs, store=tmp_path / "store")   # served from disk this time
    assert again.clean_source.startswith("store")


@contextlib.contextmanager
def _clean_forwards(model, pairs):
    """Record the batch shape of every full forward of ``model`` whose batch holds a clean prompt of ``pairs``
    (a pre-hook on the embedding: the store's forwards, cut to their longest row, count; the resume engine's
    block calls, which skip the embedding, do not)."""
    clean = pairs.clean_ids.cpu()
    calls = []

    def pre(mod, args, kwargs):
        ids = (args[0] if args else kwargs["input_ids"]).cpu()
        n = ids.shape[1]
        if n <= clean.shape[1] and any(bool((clean[:, -n:] == row).all(-1).any()) for row in ids):
            calls.append(tuple(ids.shape))

    handle = model.embed.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["flat", "padded"])
def test_store_path_runs_the_clean_prompts_once(model3, flat_pairs, padded_pairs, which, tmp_path):
    """With a store, ``prepare`` runs one forward of the clean prompts, whether the entry is missing (it is
    written from that forward's activations) or stored. One, not zero: the clean metric needs the clean logits
    and the noising sweeps resume from the clean run's KV cache; the store holds neither. (Before: three on a
    missing entry -- the clean run, a one-row probe for ``hook_z``'s shape and the store's own forward.)
    The sweeps equal those without a store bit for bit (given the same resume plan), and the entry matches the
    store's own forward."""
    from workbench.store import get_or_compute

    pairs = flat_pairs if which == "flat" else padded_pairs
    plain = wp.prepare(model3, pairs)
    with _clean_forwards(model3, pairs) as calls:
        stored = wp.prepare(model3, pairs, store=tmp_path / "store")     # entry missing: written from the run
    assert calls == [(pairs.n_pairs, pairs.n_pos)]
    with _clean_forwards(model3, pairs) as calls:
        again = wp.prepare(model3, pairs, store=tmp_path / "store")      # entry stored: read from disk
    assert calls == [(pairs.n_pairs, pairs.n_pos)]
    assert stored.clean_source.startswith("store") and again.clean_source.startswith("store")
    real = pairs.attention_mask.bool()
    for name, act in plain.clean.acts.items():
        assert torch.equal(stored.clean.acts[name][real], act[real])
        assert torch.equal(again.clean.acts[name], stored.clean.acts[name])
    assert torch.equal(stored.clean_metric, plain.clean_metric)
    for r in (stored, plain):   # the resume engine's plan depends on timings: fix it so the batches agree
        r.clean.block_overhead_tokens = r.corrupted.block_overhead_tokens = 64.0
    for comp, mode in [("resid_pre", "denoise"), ("heads", "denoise"), ("mlp_out", "noise")]:
        a = wp.exact_patch(model3, stored, comp, mode=mode, show_progress=False)
        b = wp.exact_patch(model3, plain, comp, mode=mode, show_progress=False)
        assert torch.equal(a.raw, b.raw), (comp, mode)
    names = sorted(plain.clean.acts)
    own = get_or_compute(model3, pairs.clean, hooks=names, positions="all", store=tmp_path / "own",
                         system=pairs.system, show_progress=False)                  # the store's own forward
    entry = get_or_compute(model3, pairs.clean, hooks=names, positions="all", store=tmp_path / "store",
                           system=pairs.system, show_progress=False)
    for name in names:
        assert torch.allclose(entry.activations(name), own.activations(name), atol=1e-5)


def test_store_refuses_activations_of_other_tokens(model3, flat_pairs, runs, tmp_path):
    from workbench.store import ActivationStore, Computed, get_or_compute

    names = sorted(runs.clean.acts)
    wrong = Computed(flat_pairs.corrupted_ids, flat_pairs.attention_mask, runs.clean.acts)
    with pytest.raises(WorkbenchError, match="other tokens"):
        get_or_compute(model3, flat_pairs.clean, hooks=names, positions="all", store=tmp_path,
                       show_progress=False, computed=wrong)
    lacking = Computed(flat_pairs.clean_ids, flat_pairs.attention_mask, {names[0]: runs.clean.acts[names[0]]})
    with pytest.raises(WorkbenchError, match="hold no hook"):
        get_or_compute(model3, flat_pairs.clean, hooks=names, positions="all", store=tmp_path,
                       show_progress=False, computed=lacking)
    assert ActivationStore(tmp_path).ls().empty


def test_cli_patch_json(model3, tmp_path, capsys):
    from workbench.cli import main

    model_dir = model3._wb_source["path"]
    clean, corrupted = candidate_pairs(120)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"clean": c, "corrupted": k}) + "\n" for c, k in zip(clean, corrupted)))
    rc = main(["patch", "--model", model_dir, "--pairs", str(path), "--n-pairs", "2", "--components",
               "resid_pre,heads", "--json", "--quiet", "--no-store", "--layer", "1", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_pairs"] == 2
    assert set(out["components"]) == {"resid_pre", "heads"}
    assert -1.0 <= out["pearson_attribution_vs_exact"]["heads"] <= 1.0
    assert out["subspace"]["layer"] == 1 and out["subspace"]["illusion_check"]["null_dim"] == 0
    rc = main(["patch", "--model", model_dir, "--pairs", str(path), "--components", "resid_post", "--quiet",
               "--no-store"])
    assert rc == 2
    assert "unknown component" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_reports_exactness_and_speed(model3, flat_pairs):
    from workbench.bench.patch import bench_model

    out = bench_model(model3, flat_pairs.select([0]), repeats=1)
    assert out["max_abs_diff_vs_transformer_lens"] < 1e-4
    # reported, not asserted against a threshold: one timed repeat on a shared machine is noise (it failed once
    # under load); the ratio is measured by `workbench bench patch`
    assert 0 < out["speedup_vs_transformer_lens"] < float("inf")


# ----------------------------------------------------------------------------------------------- organism
@pytest.fixture(scope="module")
def organism():
    from workbench import load_model
    from workbench.models import organism_dir

    if not (organism_dir() / "model" / "organism.json").exists():
        pytest.skip("the organism is not built")
    return load_model("organism", device="cpu")


def test_organism_resid_effect_enters_after_the_planted_layer(organism):
    from workbench.patching.run import organism_ground_truth

    planted, u = organism_ground_truth(organism)
    pairs = wp.organism_pairs(organism.tokenizer, limit=8)
    runs = wp.prepare(organism, pairs, components=["resid_pre"])
    assert runs.clean_value - runs.corrupted_value > 5.0            # harmful vs harmless: clearly separated
    resid = wp.exact_patch(organism, runs, "resid_pre", show_progress=False)
    last = resid.by_layer("last_pos")
    assert wp.first_layer_above(resid, 0.9, "last_pos") == planted + 1
    assert float(last[planted + 1]) > 0.95 and float(last[planted]) < 0.9
    sub = wp.subspace_patch(organism, runs, u, layers=[planted, planted + 1], positions="post", show_progress=False)
    assert abs(float(sub["value"][0])) < 0.1                          # u is not there before the planted write
    assert float(sub["value"][1]) > 0.9                               # and carries the effect right after it
