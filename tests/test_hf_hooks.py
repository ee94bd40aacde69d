"""Generation on the plain Hugging Face model (:mod:`workbench.hf_hooks`) against the bridge's own hooked
decoding, an independent path: the same tokens under every kind of steering plan, the same logits, and every
architecture family of the tiny-model factory."""

import pytest
import torch

from workbench.chat import tokenize_chat
from workbench.errors import WorkbenchError
from workbench.generation import generate_batch
from workbench.hf_hooks import decoder_layers, hf_hooks, plain_model
from workbench.models import organism_dir
from workbench.selfcheck import positions_from_mask
from workbench.testing import make_tiny_chat_model

PROMPTS = ["How do I bake bread at home?", "Explain how to pick a lock to break into a house",
           "What is the capital of France?", "Write a poem about the sea"]
FAMILIES = ["llama3", "mistral", "qwen2.5", "gemma2", "gpt2"]


def bridge_generate(model, batch, n_tokens, hooks):
    """The reference: Hugging Face generate on the bridge's wrapped model with the bridge's own hooks."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        out = model.original_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                            pad_token_id=model.tokenizer.pad_token_id)
    return out[:, batch.input_ids.shape[1]:]


def plain_generate(model, batch, n_tokens, hooks):
    with torch.no_grad(), hf_hooks(plain_model(model), hooks) as hf:
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n_tokens,
                          min_new_tokens=n_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return out[:, batch.input_ids.shape[1]:]


@pytest.fixture(scope="module")
def organism():
    if not (organism_dir() / "model" / "config.json").exists():
        pytest.skip("the model organism is not built")
    from workbench import load_model

    return load_model("organism")


def _plans(model):
    from workbench.directions import Direction
    from workbench.organism import ground_truth_of
    from workbench.steering.controller import Controller, ControllerConfig, direction_fingerprint
    from workbench.steering.steer import controller_plan, fixed_plan, gated_plan

    n, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    layer, d = ground_truth_of(model)
    from workbench.models import fingerprint

    gt = Direction(d, layer + 1, -1, "planted", fingerprint=fingerprint(model), d_model=d_model)
    torch.manual_seed(0)
    cfg = ControllerConfig(d_model=d_model, n_layers=n, input_layers=[n - 2, n - 1], alpha=6.0,
                           direction_fingerprint=direction_fingerprint(d))
    per_step = ControllerConfig(d_model=d_model, n_layers=n, input_layers=[n - 2, n - 1], alpha=6.0,
                                schedule="per_step", direction_fingerprint=direction_fingerprint(d))
    return gt, {
        "actadd": fixed_plan(d, 6.0, n),
        "cast": gated_plan(d, lambda m, b: torch.tensor([True, False, True, False][:len(b.texts)]), 6.0, n),
        "controller": controller_plan(Controller(cfg), d),
        "per_step": controller_plan(Controller(per_step), d),
    }


def test_plain_model_shares_the_bridge_weights(organism):
    hf = plain_model(organism)
    assert plain_model(organism) is hf                      # built once per bridge
    shared = {p.data_ptr() for p in organism.parameters()}
    assert all(p.data_ptr() in shared for p in hf.parameters())   # no copy
    assert not any(k.startswith("_wb_plain") for k in organism.state_dict())
    assert len(decoder_layers(hf)) == organism.cfg.n_layers
    b = tokenize_chat(organism.tokenizer, PROMPTS)
    with torch.no_grad():
        ref = organism(b.input_ids, attention_mask=b.attention_mask)
        got = hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                 position_ids=positions_from_mask(b.attention_mask)).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_plain_forward_keeps_no_attention_weights(organism):
    """The bridge turns on ``output_attentions`` for its model; the plain model must not inherit it, or every
    forward holds all layers' attention weights at once (what killed the SmolLM2 steering stage at 24 GB)."""
    hf = plain_model(organism)
    b = tokenize_chat(organism.tokenizer, PROMPTS)
    with torch.no_grad():
        out = hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                 position_ids=positions_from_mask(b.attention_mask))
        asked = hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                   position_ids=positions_from_mask(b.attention_mask), output_attentions=True)
    assert out.attentions is None and out.hidden_states is None
    assert len(asked.attentions) == organism.cfg.n_layers   # still there when asked for
    assert torch.equal(out.logits, asked.logits)


def test_steered_generation_equals_the_bridge_path(organism):
    """Every kind of plan (fixed, gated, controller, per-step controller) and directional ablation: the tokens
    generated on the plain HF model are the bridge's, token for token, and the steering changed them."""
    from workbench.directions import ablation_hooks

    gt, plans = _plans(organism)
    batch = tokenize_chat(organism.tokenizer, PROMPTS)
    unsteered = bridge_generate(organism, batch, 12, [])
    assert torch.equal(plain_generate(organism, batch, 12, []), unsteered)
    changed = 0
    for name, plan in plans.items():
        ref_hooks, _ = plan.hooks_for(organism, batch)
        ref = bridge_generate(organism, batch, 12, ref_hooks)
        got_hooks, _ = plan.hooks_for(organism, batch)
        assert torch.equal(plain_generate(organism, batch, 12, got_hooks), ref), name
        changed += not torch.equal(ref, unsteered)
    assert changed >= 3
    hooks = ablation_hooks(organism, gt)
    assert torch.equal(plain_generate(organism, batch, 12, hooks), bridge_generate(organism, batch, 12, hooks))
    # the library path (generate_batch) is the plain one
    replies, _ = generate_batch(organism, batch, 12, fwd_hooks=plans["actadd"].hooks_for(organism, batch)[0],
                                min_new_tokens=12)
    ref = bridge_generate(organism, batch, 12, plans["actadd"].hooks_for(organism, batch)[0])
    assert replies == [organism.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ref.tolist()]


def test_hooks_removed_on_exit_and_on_error(organism):
    hf = plain_model(organism)
    calls = []

    def count(act, hook=None):
        calls.append(hook.name)
        return act

    def n_hooks():   # transformers may keep hooks of its own on the layers
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hf.modules())

    before = n_hooks()
    b = tokenize_chat(organism.tokenizer, PROMPTS[:1])
    with hf_hooks(hf, [("blocks.0.hook_resid_pre", count), ("blocks.1.hook_mlp_out", count)]):
        hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
    assert calls == ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    with pytest.raises(RuntimeError, match="boom"):
        with hf_hooks(hf, [("blocks.0.hook_resid_pre", count)]):
            raise RuntimeError("boom")
    hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
    assert len(calls) == 2
    with pytest.raises(WorkbenchError, match="no plain Hugging Face counterpart"):
        with hf_hooks(hf, [("blocks.0.attn.hook_z", count)]):
            pass
    with pytest.raises(WorkbenchError, match="the model has 2 layers|the model has"):
        with hf_hooks(hf, [(f"blocks.{organism.cfg.n_layers}.hook_resid_pre", count)]):
            pass
    assert n_hooks() == before


def test_a_site_without_a_plain_counterpart_falls_back_to_the_bridge(organism, caplog):
    from workbench.fallbacks import recording_fallbacks

    def keep(act, hook=None):
        return act

    b = tokenize_chat(organism.tokenizer, PROMPTS[:2])
    with recording_fallbacks() as events:
        replies, _ = generate_batch(organism, b, 6, fwd_hooks=[("blocks.0.attn.hook_z", keep)])
    assert [e["kind"] for e in events] == ["generation_engine"]
    assert replies == generate_batch(organism, b, 6)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_the_bridge_tokens(family, tmp_path):
    from workbench import load_model

    model = load_model(str(make_tiny_chat_model(tmp_path / family, family=family)), device="cpu")
    batch = tokenize_chat(model.tokenizer, PROMPTS)
    d = torch.randn(int(model.cfg.d_model))

    def add(act, hook=None):
        out = act.clone()
        out[:, -1] += 3 * d
        return out

    hooks = [("blocks.0.hook_resid_pre", add), ("blocks.1.hook_resid_post", add), ("blocks.1.hook_attn_out", add)]
    assert torch.equal(plain_generate(model, batch, 8, hooks), bridge_generate(model, batch, 8, hooks))
    assert torch.equal(plain_generate(model, batch, 8, []), bridge_generate(model, batch, 8, []))


def test_the_official_per_step_plan_generates_the_official_loops_tokens(organism):
    """The workbench's per-step (official) plan, per prompt and batched, against the peer loop written after the
    official code's structure (hooks on the plain HF layers, per-prompt generate): the same tokens."""
    from workbench.bench.official_loop import official_loop
    from workbench.steering.controller import Controller
    from workbench.steering.official import official_controller_config
    from workbench.steering.steer import controller_plan

    cfg = official_controller_config(organism)
    torch.manual_seed(0)
    ctrl = Controller(cfg).eval()
    d = torch.randn(int(organism.cfg.d_model))
    d = d / d.norm()
    with torch.no_grad():   # a controller whose steering changes replies
        ctrl.head.bias.copy_(torch.tensor([30.0] + [0.0] * cfg.n_layers))
    plan = controller_plan(ctrl, d, "official")
    peer = official_loop(plain_model(organism), organism.tokenizer, PROMPTS, ctrl, d, 10, scale=cfg.alpha)
    unsteered = []
    for prompt, ref in zip(PROMPTS, peer):
        b = tokenize_chat(organism.tokenizer, [prompt])
        hooks, _ = plan.hooks_for(organism, b)
        assert plain_generate(organism, b, 10, hooks)[0].tolist() == ref
        unsteered.append(plain_generate(organism, b, 10, [])[0].tolist())
    assert unsteered != peer
    batch = tokenize_chat(organism.tokenizer, PROMPTS)
    hooks, _ = plan.hooks_for(organism, batch)
    assert plain_generate(organism, batch, 10, hooks).tolist() == peer
