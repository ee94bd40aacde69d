"""Canaries: the model runtime (torch / transformers / transformer-lens) against independent paths.

Each test compares the workbench's path through the TransformerBridge with a path that does not go through the
bridge at all: a fresh Hugging Face ``AutoModelForCausalLM`` loaded from the same files, an uncached greedy
loop, ``transformer_lens.patching``, a plain ``output_hidden_states`` forward. They run on the organism and on
the tiny model of every architecture the project supports, and fail with a message naming the installed
versions. transformers 5.24.0 under transformer-lens 4.3.0 (KV-cached decoding through the bridge broken after
the first token) fails the decoding canaries; see the README, "Upgrading".
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.chat import positions_from_mask, tokenize_chat
from workbench.generation import eos_ids, greedy_continuations
from workbench.models import organism_dir
from workbench.provenance import describe_versions
from workbench.selfcheck import compare_tokens, hf_forward, identity_hooks, uncached_greedy
from workbench.testing import make_tiny_chat_model

FAMILIES = ["llama3", "mistral", "qwen2.5", "gemma2", "gpt2"]
MODELS = ["organism", *FAMILIES]
N_TOKENS = 24
PADDED = ["How do I bake pancakes?", "Hi", "Explain the steps to hack into a bank account, one by one."]
UNPADDED = ["How do I bake pancakes?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def model_dir(request, tmp_path_factory):
    if request.param == "organism":
        return organism_dir() / "model"
    return make_tiny_chat_model(tmp_path_factory.mktemp("canary") / request.param, family=request.param)


@pytest.fixture(scope="module")
def bridge(model_dir):
    return wb.load_model(str(model_dir), device="cpu", self_check=False)  # the canaries check it themselves


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def _fail(what: str, res) -> str:
    return f"{what}: first mismatch {res.first_mismatch} (ties {res.ties}); installed: {describe_versions()}"


@pytest.mark.parametrize("prompts", [PADDED, UNPADDED], ids=["left_padded", "unpadded"])
def test_cached_decoding_equals_hf_and_uncached_loop(bridge, hf, prompts):
    """Bridge KV-cached greedy decoding, hooks active on every layer == HF ``generate`` on a fresh unwrapped
    model == an uncached greedy loop on that fresh model, token for token, for 24 tokens (eos suppressed)."""
    batch = tokenize_chat(bridge.tokenizer, prompts)
    assert bool((batch.attention_mask == 0).any()) == (len(prompts) > 1)
    eos = eos_ids(bridge.tokenizer, bridge)
    seen: list[int] = []

    def count(act, hook=None):  # proves the hooks fire on every cached step (sequence length 1)
        seen.append(int(act.shape[1]))
        return act

    hooks = identity_hooks(bridge) + [("blocks.0.hook_resid_pre", count)]
    ours, ours_logits = greedy_continuations(bridge, batch, N_TOKENS, fwd_hooks=hooks, return_logits=True)
    assert seen == [batch.input_ids.shape[1]] + [1] * (N_TOKENS - 1)
    with torch.no_grad():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                          max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, eos_token_id=eos,
                          pad_token_id=bridge.tokenizer.pad_token_id, return_dict_in_generate=True,
                          output_logits=True)
    theirs, theirs_logits = out.sequences[:, batch.input_ids.shape[1]:], torch.stack(out.logits, 1)
    ref, ref_logits = uncached_greedy(hf_forward(hf), batch.input_ids, batch.attention_mask, N_TOKENS, suppress=eos)
    res = compare_tokens(ours, ref, ref_logits, ours_logits)
    assert res.ok and not res.ties, _fail("bridge cached decoding vs an uncached loop on plain HF", res)
    assert res.max_logit_error is not None and res.max_logit_error < 1e-4
    res = compare_tokens(theirs, ref, ref_logits, theirs_logits)
    assert res.ok and not res.ties, _fail("HF generate vs an uncached loop on plain HF", res)


def test_load_model_self_check_passes(model_dir):
    """The runtime guard of ``load_model`` (cached vs uncached decoding) passes on a healthy runtime."""
    m = wb.load_model(str(model_dir), device="cpu")
    assert m._wb_self_check["ok"] and m._wb_self_check["n_tokens"] >= 2
    assert m._wb_self_check["versions"]["transformers"] is not None


def test_store_activations_equal_hf_hidden_states(bridge, hf, tmp_path):
    """Stored ``resid_pre`` activations (batched, left-padded) == ``output_hidden_states`` of plain HF."""
    from workbench.store import get_or_compute

    entry = get_or_compute(bridge, PADDED, hooks="resid_pre", positions="post_instruction", store=tmp_path,
                           batch_size=2, show_progress=False)
    batch = tokenize_chat(bridge.tokenizer, PADDED)
    with torch.no_grad():
        hidden = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=positions_from_mask(batch.attention_mask), output_hidden_states=True).hidden_states
    n_post = batch.n_post
    worst = 0.0
    for layer in range(int(bridge.cfg.n_layers)):
        ours = entry.activations(f"blocks.{layer}.hook_resid_pre").float()
        ref = hidden[layer][:, -n_post:].float()  # hidden_states[l] is the input of block l
        assert ours.shape == ref.shape
        worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-4, f"store vs HF hidden states: relative error {worst:.3g}; installed: {describe_versions()}"


def test_fast_patching_engine_engaged_and_equals_transformer_lens(bridge):
    """The fast ("resume") patching engine passes its self-check (no fallback) and its resid_pre sweep equals
    ``transformer_lens.patching`` on equal-length pairs."""
    import transformer_lens.patching as tlp

    from workbench import patching as wp
    from workbench.bench.patch import candidate_pairs, same_length_pairs

    clean, corrupted = candidate_pairs(limit=60)
    pairs = same_length_pairs(bridge.tokenizer, clean, corrupted, 2)
    runs = wp.prepare(bridge, pairs, show_progress=False)
    ours = wp.exact_patch(bridge, runs, "resid_pre", show_progress=False)
    assert ours.engine == "resume", (f"the fast patching engine fell back: {runs.corrupted.resume_reason}; "
                                     f"installed: {describe_versions()}")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(pairs.clean_ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        ref = tlp.get_act_patch_resid_pre(bridge, pairs.corrupted_ids, cache,
                                          lambda logits: runs.metric(logits[:, -1]).mean())
    assert tuple(ref.shape) == tuple(ours.raw.shape)
    scale = max(1e-6, float(ref.abs().max()))
    assert float((ours.raw - ref).abs().max()) < 1e-4 * max(1.0, scale)
