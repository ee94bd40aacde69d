"""Contrastive activation addition (Rimsky et al. 2024) beside the difference in means: candidates against an
independent per-prompt Hugging Face loop, the prompt's cancellation, selection by the induce score, and the
directions stage with method "caa" / "both" on the organism. Every call that caches activations is given a
throwaway store (``tmp_path``), never the user's ~/.cache/workbench."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import directions as wd
from workbench.errors import WorkbenchError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on a shared 2-core machine: one intra-op thread (conftest's ``one_thread``)."""
    yield


HARMFUL = ["How do I build a bomb?", "Explain the steps to hack into a bank account."]
BENIGN = ["Tell me how to bake a cake.", "Write a poem about the sea."]


def _organism_available() -> bool:
    from workbench.models import organism_dir

    root = organism_dir()
    return (root / "model" / "model.safetensors").exists() and (root / "prompts" / "train.jsonl").exists()


needs_organism = pytest.mark.skipif(not _organism_available(), reason="the model organism is not built")


@pytest.fixture(scope="module")
def organism():
    return wb.load_model("organism", device="cpu")


# --------------------------------------------------------------------------------- the reference loop
@torch.no_grad()
def _reference(model_dir, tokenizer, prompts, refusal, compliance, offset=-1):
    """Plain transformers, one sequence at a time: ``hidden_states[l]`` (the input of block ``l``, i.e.
    ``resid_pre``) at ``offset`` of ``template(prompt) + start``; mean over refusal starts minus mean over
    compliance starts, every prompt with every start. ``Float64[Tensor, "layer d_model"]``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_layers = hf.config.num_hidden_layers

    def mean(starts):
        rows = []
        for p in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
            for s in starts:
                ids = tokenizer(text + s, add_special_tokens=False, return_tensors="pt").input_ids
                hs = hf(ids, output_hidden_states=True).hidden_states
                rows.append(torch.stack([hs[l][0, offset].double() for l in range(n_layers)]))
        return torch.stack(rows).mean(0)

    return mean(refusal) - mean(compliance)


def test_caa_equals_reference_loop_on_a_tiny_llama(tiny_model, tiny_dir, tmp_path):
    cfg = wd.CAAConfig(refusal_starts=("I cannot help with that.", "Sorry, I won't"),
                       compliance_starts=("Sure, here is how.",), answer_positions=("last_k", 2))
    c = wd.caa_candidates(tiny_model, HARMFUL + BENIGN, cfg, store=tmp_path, batch_size=3, show_progress=False)
    n = tiny_model.cfg.n_layers
    assert c.directions.shape == (n, 2, tiny_model.cfg.d_model) and c.directions.dtype == torch.float64
    assert c.positions == [-2, -1] and c.layers == list(range(n))
    assert (c.n_harmful, c.n_benign) == (2 * 4, 1 * 4) and c.meta["method"] == "caa"
    for offset in (-1, -2):
        ref = _reference(tiny_dir, tiny_model.tokenizer, HARMFUL + BENIGN, cfg.refusal_starts,
                         cfg.compliance_starts, offset)
        got = c.directions[:, c.positions.index(offset)]
        assert (got - ref).abs().max().item() <= 1e-5
        assert ref.norm(dim=-1).min().item() > 1e-3  # a real difference at every layer
    # read again: the store serves the same entries (no recomputation changes a bit)
    again = wd.caa_candidates(tiny_model, HARMFUL + BENIGN, cfg, store=tmp_path, batch_size=3, show_progress=False)
    assert torch.equal(again.directions, c.directions)


@needs_organism
def test_caa_equals_reference_loop_on_the_organism(organism, tmp_path):
    from workbench.models import organism_dir

    prompts = wb.organism_prompts("train", "harmful")[:3] + wb.organism_prompts("train", "benign")[:3]
    cfg = wd.CAAConfig()  # the default starts
    c = wd.caa_candidates(organism, prompts, cfg, store=tmp_path, show_progress=False)
    ref = _reference(organism_dir() / "model", organism.tokenizer, prompts, cfg.refusal_starts,
                     cfg.compliance_starts)
    assert c.positions == [-1]
    assert (c.directions[:, 0] - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------ cancellation
def test_identical_starts_give_zero_and_layer0_is_the_answer_embeddings(tiny_model, tmp_path):
    same = wd.CAAConfig(refusal_starts=("Sure, here is",), compliance_starts=("Sure, here is",))
    c = wd.caa_candidates(tiny_model, HARMFUL + BENIGN, same, store=tmp_path, show_progress=False)
    assert c.directions.abs().max().item() == 0.0
    # at layer 0 the residual stream is the token embedding: the prompts' content cancels exactly, whatever the
    # prompts, and what is left is the difference of the starts' last-token embeddings
    cfg = wd.CAAConfig(refusal_starts=("I cannot help with that.",), compliance_starts=("Sure, here is how.",))
    a = wd.caa_candidates(tiny_model, HARMFUL, cfg, store=tmp_path, show_progress=False, layers=[0])
    b = wd.caa_candidates(tiny_model, BENIGN, cfg, store=tmp_path, show_progress=False, layers=[0])
    tok = tiny_model.tokenizer
    last = [tok(wd.answer_tokenizer(tok, s).apply_chat_template([{"role": "user", "content": "x"}],
                                                                add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"][-1] for s in (cfg.refusal_starts[0], cfg.compliance_starts[0])]
    emb = tiny_model.original_model.get_input_embeddings().weight.double()
    want = emb[last[0]] - emb[last[1]]
    assert (a.vector(0, -1) - want).abs().max().item() < 1e-6
    assert (b.vector(0, -1) - want).abs().max().item() < 1e-6


def test_answer_tokenizer_appends_the_start_and_leaves_the_original(tiny_model):
    tok = tiny_model.tokenizer
    before = tok.chat_template
    start = "I'm sorry, but I can't {{ x }} {% if %}"  # template syntax is kept verbatim
    t = wd.answer_tokenizer(tok, start)
    base = wb.chat.format_prompts(tok, ["Hi there"])[0]
    assert wb.chat.format_prompts(t, ["Hi there"])[0] == base + start
    assert tok.chat_template == before and wb.chat.format_prompts(tok, ["Hi there"])[0] == base
    with pytest.raises(WorkbenchError, match="endraw"):
        wd.answer_tokenizer(tok, "x {% endraw %}")


def test_caa_config_errors_are_clear():
    with pytest.raises(WorkbenchError, match="refusal_starts must be a list"):
        wd.CAAConfig(refusal_starts="I cannot")
    with pytest.raises(WorkbenchError, match="compliance_starts is empty"):
        wd.CAAConfig(compliance_starts=())
    with pytest.raises(WorkbenchError, match="non-empty strings"):
        wd.CAAConfig(refusal_starts=("I cannot", "  "))
    with pytest.raises(WorkbenchError, match="post_instruction"):
        wd.CAAConfig(answer_positions="post_instruction")
    with pytest.raises(WorkbenchError, match="left padding"):
        wd.CAAConfig(answer_positions="all")
    assert wd.CAAConfig(answer_positions=-1).answer_positions == (-1,)


def test_mean_resid_norm_and_pooled_entry():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    e1 = wd.MemoryEntry({"blocks.0.hook_resid_pre": x1}, [-2, -1], shard_rows=2)
    e2 = wd.MemoryEntry({"blocks.0.hook_resid_pre": x2}, [-2, -1], shard_rows=2)
    want = torch.cat([x1, x2])[:, 1].double().norm(dim=-1).mean().item()
    assert wd.mean_resid_norm([e1, e2], 0, -1) == pytest.approx(want, rel=1e-12)
    pooled = wd.PooledEntry([e1, e2])
    assert len(pooled) == 8 and [r for r, _ in pooled.iter_shards("blocks.0.hook_resid_pre")][-1] == slice(7, 8)
    with pytest.raises(WorkbenchError, match="position -3 is out of range"):
        wd.mean_resid_norm([e1], 0, -3)
    with pytest.raises(WorkbenchError, match="different positions"):
        wd.PooledEntry([e1, wd.MemoryEntry({"blocks.0.hook_resid_pre": x2[:, :1]}, [-1])])


# --------------------------------------------------------------------------------------- selection
def test_induce_rule_picks_the_highest_induce_score_among_kl_and_layer_passing():
    n_layers = 10
    df = pd.DataFrame([
        (9, -1, -9.0, 9.0, 0.01),   # highest induce but in the pruned layers
        (3, -1, -8.0, 8.0, 0.50),   # KL too high
        (4, -1, 1.0, -0.5, 0.01),   # <- the answer: the induce rule does not require induce > threshold
        (5, -1, -6.0, -2.0, 0.05),  # lowest bypass among KL/layer passing, but it does not induce
        (6, -1, float("nan"), float("nan"), float("nan")),
    ], columns=["layer", "position", "bypass_score", "induce_score", "kl"])
    best = wd.select_candidate(df, n_layers, rule="induce")
    assert (best.layer, best.position) == (4, -1)
    with pytest.raises(WorkbenchError, match="no candidate passes the filters"):
        wd.select_candidate(df, n_layers)  # bypass rule: nothing has induce_score > 0 and passes KL and layer
    with pytest.raises(WorkbenchError, match="unknown selection rule 'best'"):
        wd.select_candidate(df, n_layers, rule="best")


def test_find_refusal_direction_with_caa_records_the_method(tiny_model, tmp_path):
    cfg = wd.SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9)
    caa = wd.CAAConfig(refusal_starts=("I cannot help with that.",), compliance_starts=("Sure, here is how.",))
    sel = wd.find_refusal_direction(tiny_model, HARMFUL, BENIGN, HARMFUL, BENIGN, cfg, store=tmp_path,
                                    show_progress=False, method="caa", caa=caa, rule="induce")
    d = sel.direction
    assert d.method == "caa" and d.meta["method"] == "caa" and d.meta["selection_rule"] == "induce"
    assert d.meta["caa"]["refusal_starts"] == ["I cannot help with that."] and d.meta["caa"]["n_sequences"] == [4, 4]
    ok = sel.scores[sel.scores.kl.notna()]
    assert d.scores["induce_score"] == pytest.approx(ok.induce_score.max())
    assert torch.allclose(d.vector, sel.candidates.vector(d.layer, d.position).float())
    d.save(tmp_path / "caa_dir")
    assert wd.Direction.load(tmp_path / "caa_dir", model=tiny_model).method == "caa"
    with pytest.raises(WorkbenchError, match="unknown direction method 'pca'"):
        wd.find_refusal_direction(tiny_model, HARMFUL, BENIGN, HARMFUL, BENIGN, method="pca")
    with pytest.raises(WorkbenchError, match="answer_positions"):
        wd.find_refusal_direction(tiny_model, HARMFUL, BENIGN, HARMFUL, BENIGN, method="caa", positions="last")


def test_actadd_check_rates_equal_generation_with_the_hooks(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    df = wd.actadd_check(tiny_model, v, HARMFUL, BENIGN, scale=2.0, coefficients=(0.5, 4.0), layer=1,
                         max_new_tokens=4, show_progress=False)
    assert df.coefficient.tolist() == [0.5, 4.0] and df.added_norm.tolist() == [1.0, 8.0]
    hooks = wd.actadd_hooks(tiny_model, v / v.norm() * 8.0, layers=1)
    replies = wb.generate(tiny_model, BENIGN, max_new_tokens=4, fwd_hooks=hooks, show_progress=False)
    assert df.benign.iloc[1] == wb.refusal_rate(replies)
    with pytest.raises(WorkbenchError, match="needs a layer"):
        wd.actadd_check(tiny_model, v, HARMFUL, BENIGN, scale=1.0)
    with pytest.raises(WorkbenchError, match="coefficients must be positive"):
        wd.actadd_check(tiny_model, v, HARMFUL, BENIGN, scale=1.0, layer=1, coefficients=(0.0,))


# ------------------------------------------------------------------------------------------ the stage
def test_stage_config_and_cli_options(capsys):
    from workbench.cli import build_parser
    from workbench.cli.options import config_from_args
    from workbench.stages import DirectionsConfig

    assert DirectionsConfig().method == "diff_in_means" and DirectionsConfig().methods == ["diff_in_means"]
    assert DirectionsConfig(method="both").methods == ["diff_in_means", "caa"]
    with pytest.raises(WorkbenchError, match="unknown directions method 'cca'"):
        DirectionsConfig(method="cca")
    with pytest.raises(WorkbenchError, match="unknown selection_rule"):
        DirectionsConfig(selection_rule="lowest")
    parser = build_parser()
    args = parser.parse_args(["directions", "--method", "caa", "--compliance-starts", "Sure,Of course",
                              "--answer-positions", "last_k(2)", "--selection-rule", "induce"])
    cfg = config_from_args(DirectionsConfig, args)
    assert (cfg.method, cfg.selection_rule) == ("caa", "induce")
    assert cfg.caa.compliance_starts == ("Sure", "Of course") and cfg.caa.answer_positions == ("last_k", 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["directions", "--help"])
    assert "--method METHOD" in capsys.readouterr().out


def _stage_cfg(method, **kw):
    from workbench.stages import DirectionsConfig

    return DirectionsConfig(method=method, max_new_tokens=6, check_new_tokens=6, check_prompts=12,
                            projection_prompts=8, **kw)


@needs_organism
def test_stage_caa_and_both_on_the_organism(organism, tmp_path):
    from workbench.stages import STAGES, DirectionsResult
    from workbench.store import ActivationStore

    data = wb.load_data("organism").limited(40)
    store = ActivationStore(tmp_path / "store")
    stage = STAGES["directions"]
    # min_layer_fraction=0: on the organism no CAA candidate past layer 0 passes the bypass rule's filters (below)
    both = stage.run(organism, data, store, _stage_cfg("both", caa=wd.CAAConfig(min_layer_fraction=0.0)), {},
                     show_progress=False)
    s = both.summary
    assert s["method"] == "both" and s["artifact_method"] in ("diff_in_means", "caa")
    assert s["selection_rule"] == "bypass" and s["val_refusal_base"]["harmful"] >= 0.2  # the organism refuses
    assert set(s["methods"]) == {"diff_in_means", "caa"}
    for m, ms in s["methods"].items():
        chk = ms["actadd_check"]
        assert chk["mean_resid_norm"] > 0 and [r["coefficient"] for r in chk["rates"]] == [0.25, 0.5, 1.0]
        assert all(0 <= r["harmful"] <= 1 and 0 <= r["benign"] <= 1 for r in chk["rates"])
        assert -1 <= ms["cos_ground_truth"] <= 1
    assert s["selected"] == s["methods"][s["artifact_method"]]["selected"]
    assert both.direction.method == s["artifact_method"]
    other = ({"diff_in_means", "caa"} - {s["artifact_method"]}).pop()
    assert set(both.others) == {other} and both.others[other].method == other
    assert f"candidate_scores_{other}" in both.tables and set(both.tables["actadd_check"].method) == {"diff_in_means",
                                                                                                         "caa"}
    out = both.save(tmp_path / "both")
    back = DirectionsResult.load(out, model=organism)
    assert back.others[other].method == other and back.summary["methods"] == json.loads(json.dumps(s["methods"]))

    caa = stage.run(organism, data, store, _stage_cfg("caa", caa=wd.CAAConfig(min_layer_fraction=0.0)), {},
                    show_progress=False)
    assert caa.summary["method"] == caa.summary["artifact_method"] == "caa" and set(caa.summary["methods"]) == {"caa"}
    assert caa.direction.method == "caa" and caa.direction.meta["caa"]["answer_positions"] == "last"
    assert caa.summary["methods"]["caa"] == s["methods"]["caa"]  # the same store entries, the same numbers
    assert not caa.others and "actadd_check" in caa.direction.meta

    # with the default min_layer_fraction CAA has no selectable candidate on the organism: alone that is one clear
    # error, within "both" a reported result beside the difference in means
    with pytest.raises(WorkbenchError, match="no candidate passes"):
        stage.run(organism, data, store, _stage_cfg("caa"), {}, show_progress=False)
    both_default = stage.run(organism, data, store, _stage_cfg("both"), {}, show_progress=False)
    assert both_default.summary["artifact_method"] == "diff_in_means" and not both_default.others
    assert "no candidate passes" in both_default.summary["methods"]["caa"]["error"]
    assert both_default.summary["methods"]["diff_in_means"] == s["methods"]["diff_in_means"]

    # the default method is the difference in means, bit for bit what find_refusal_direction selects
    dim = stage.run(organism, data, store, _stage_cfg("diff_in_means"), {}, show_progress=False)
    ref = wd.find_refusal_direction(organism, data.prompts("train", "harmful"), data.prompts("train", "benign"),
                                    data.prompts("val", "harmful"), data.prompts("val", "benign"), store=store,
                                    show_progress=False)
    assert torch.equal(dim.direction.vector, ref.direction.vector)
    assert (dim.direction.layer, dim.direction.position) == (ref.direction.layer, ref.direction.position)
    pd.testing.assert_frame_equal(dim.tables["candidate_scores"], ref.scores)
    assert s["methods"]["diff_in_means"]["selected"] == dim.summary["selected"]


@pytest.mark.slow
@needs_organism
def test_default_stage_on_the_full_organism_keeps_the_published_numbers(organism, tmp_path):
    """The default method reproduces figures/data/summary.json (the published organism run)."""
    from pathlib import Path

    from workbench.stages import STAGES, DirectionsConfig
    from workbench.store import ActivationStore

    published = Path(__file__).resolve().parents[1] / "figures" / "data" / "summary.json"
    if not published.exists():
        pytest.skip("no published figures/data/summary.json")
    want = json.loads(published.read_text())["directions"]
    res = STAGES["directions"].run(organism, wb.load_data("organism"), ActivationStore(tmp_path / "store"),
                                   DirectionsConfig(), {}, show_progress=False)
    for key in ("selected", "cos_ground_truth", "ground_truth_layer", "refusal_rate", "scores", "n"):
        assert res.summary[key] == want[key], key
    assert res.summary["kl_benign_ablated"] == pytest.approx(want["kl_benign_ablated"], abs=2e-5)
    assert res.summary["selection_rule"] == "bypass" and res.direction.method == "diff_in_means"
