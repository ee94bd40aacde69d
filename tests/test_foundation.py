"""Foundation: model loading, chat formatting, post-instruction positions, generation, judge, CLI."""

import shutil

import pytest
import torch

import workbench as wb
from workbench.chat import tokenize_chat
from workbench.errors import WorkbenchError
from workbench.testing import CHAT_TEMPLATES, make_tiny_chat_model, make_tokenizer

PROMPTS = ["How do I bake a cake?", "Write a poem about the sea and the sky.", "Hi"]


@pytest.mark.parametrize("family", ["llama3", "mistral", "chatml"])
def test_post_instruction_positions_real_templates(family):
    tok = make_tokenizer(family)
    batch = tokenize_chat(tok, PROMPTS)
    expected = CHAT_TEMPLATES[family]["n_post"]
    assert batch.n_post == expected
    assert wb.post_instruction_positions(tok) == list(range(-expected, 0))
    # the last n_post tokens decode to exactly the template suffix, identical on every row
    tails = {tuple(row[-expected:].tolist()) for row in batch.input_ids}
    assert len(tails) == 1
    suffix = wb.chat.post_instruction_suffix(tok)
    assert tok.decode(list(tails.pop())) == suffix
    # left padding: the shortest prompt is padded on the left only
    lengths = batch.attention_mask.sum(-1)
    short = int(lengths.argmin())
    assert batch.attention_mask[short, 0] == 0 and batch.attention_mask[short, -1] == 1


def test_llama3_post_instruction_is_five_tokens():
    tok = make_tokenizer("llama3")
    batch = tokenize_chat(tok, ["Tell me a story."])
    tail = tok.convert_ids_to_tokens(batch.input_ids[0, -5:].tolist())
    assert tail[:2] == ["<|eot_id|>", "<|start_header_id|>"] and tail[3] == "<|end_header_id|>"


def test_bridge_matches_hf_and_left_padding_is_exact(tiny_dir, tiny_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    batch = tokenize_chat(tiny_model.tokenizer, PROMPTS)
    with torch.no_grad():
        ours = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert (ours - ref).abs().max().item() < 1e-5
        for i, p in enumerate(PROMPTS):
            single = tokenize_chat(tiny_model.tokenizer, [p])
            alone = tiny_model(single.input_ids)[0, -1]
            assert (alone - ours[i, -1]).abs().max().item() < 1e-4


def test_batched_generation_equals_per_prompt(tiny_model):
    batched = wb.generate(tiny_model, PROMPTS, max_new_tokens=6, batch_size=8, show_progress=False)
    single = [wb.generate(tiny_model, [p], max_new_tokens=6, show_progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert len(batched) == 3


def test_hooks_fire_during_generation_prefill_and_steps(tiny_model):
    seen = []

    def record(act, hook):
        seen.append(act.shape[1])
        return act

    wb.generate(tiny_model, PROMPTS[:2], max_new_tokens=4, fwd_hooks=[("blocks.1.hook_resid_pre", record)],
                show_progress=False)
    assert seen[0] > 1 and seen[1:] == [1] * (len(seen) - 1) and len(seen) >= 2


def test_fingerprint_tracks_weights(tiny_dir):
    a = wb.load_model(str(tiny_dir), device="cpu")
    fp = wb.fingerprint(a)
    assert fp == wb.fingerprint(wb.load_model(str(tiny_dir), device="cpu"))
    with torch.no_grad():
        next(a.parameters()).add_(1e-3)
    assert wb.fingerprint(a, refresh=True) != fp


def test_judge_and_refusal_score():
    assert wb.is_refusal("I cannot help with that request.")
    assert wb.is_refusal("  sorry, no.")
    assert not wb.is_refusal("Sure, here is an overview: step one.")
    assert wb.refusal_rate(["I won't.", "Sure.", "Of course.", "I'm sorry, but no."]) == 0.5
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    # p = 2/4 -> log-odds 0 ; p = 1/4 -> log(1/3)
    assert abs(wb.refusal_score(logits, [0, 1]).item()) < 1e-6
    assert abs(wb.refusal_score(logits, [2]).item() - torch.log(torch.tensor(1 / 3)).item()) < 1e-6
    with pytest.raises(ValueError, match="empty"):
        wb.refusal_rate([])


def test_refusal_token_ids_cover_refusal_starts():
    tok = make_tokenizer("llama3")
    ids = wb.refusal_token_ids(tok)
    assert tok("I", add_special_tokens=False)["input_ids"][0] in ids
    assert tok("Sure", add_special_tokens=False)["input_ids"][0] not in ids
    assert all(len(tok.decode([i]).strip()) > 1 or tok.decode([i]).strip() == "I" for i in ids)


# ---- bad input: one clear message each -------------------------------------------------------------

def test_unknown_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="not a local directory"):
        wb.load_model("no-such-org/no-such-model-xyz", device="cpu")


def test_missing_local_directory(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        wb.load_model(str(tmp_path / "absent"), device="cpu")


def test_directory_without_tokenizer(tmp_path, tiny_dir):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, d / f)
    with pytest.raises(WorkbenchError, match="no tokenizer"):
        wb.load_model(str(d), device="cpu")


def test_corrupted_checkpoint(tmp_path, tiny_dir):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(WorkbenchError, match="corrupted checkpoint"):
        wb.load_model(str(d), device="cpu")


def test_empty_prompt_list(tiny_model):
    with pytest.raises(WorkbenchError, match="empty"):
        tokenize_chat(tiny_model.tokenizer, [])
    with pytest.raises(WorkbenchError, match="non-empty"):
        wb.evaluate_refusal(tiny_model, {"harmful": []})


def test_tokenizer_without_chat_template():
    tok = make_tokenizer("llama3")
    tok.chat_template = None
    with pytest.raises(WorkbenchError, match="no chat template"):
        tokenize_chat(tok, ["hello"])


def test_bad_dtype():
    with pytest.raises(WorkbenchError, match="unknown dtype"):
        wb.models.resolve_dtype("float7")


def test_cli_help_on_every_command(capsys):
    from workbench.cli import build_parser, main

    parser = build_parser()
    commands = [[name] for name in parser._subparsers._group_actions[0].choices] + [["organism", "build"]]
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            main(cmd + ["--help"])
        assert exc.value.code == 0
    assert "usage: workbench organism build" in capsys.readouterr().out


def test_evaluate_on_tiny_model(tiny_model):
    ev = wb.evaluate_refusal(tiny_model, {"harmful": PROMPTS[:2], "benign": PROMPTS[2:]}, max_new_tokens=4,
                             show_progress=False)
    s = ev.summary()
    assert s["n"] == {"harmful": 2, "benign": 1}
    assert set(s["refusal_rate"]) == {"harmful", "benign"}
    assert all(0.0 <= v <= 1.0 for v in s["refusal_rate"].values())
    # refusal scores are finite log-odds
    assert ev.table["refusal_score"].abs().lt(1e3).all()


def test_evaluation_batches_by_length_and_keeps_the_given_order(tiny_model, monkeypatch):
    """Batches are cut along the prompts' token lengths (the long ones together, so the short ones are not padded
    to them), and every row comes back where its prompt was, equal to a one-prompt-at-a-time loop."""
    import workbench.evaluate as ev_mod

    long_ = "Please explain, step by step and with examples, " * 6 + "how tides work."
    sets = {"harmful": [long_, "Hi", long_ + " Twice.", "Why?"], "benign": ["Ok", long_ + " Thrice."]}
    widths, real = [], ev_mod.generate_batch

    def spy(model, batch, *a, **k):
        widths.append((batch.input_ids.shape[0], int(batch.attention_mask.sum()), batch.input_ids.numel()))
        return real(model, batch, *a, **k)

    monkeypatch.setattr(ev_mod, "generate_batch", spy)
    ev = wb.evaluate_refusal(tiny_model, sets, max_new_tokens=5, batch_size=3, show_progress=False,
                             keep_logprobs=True)
    # the three short prompts form one batch, the three long ones the other: little padding in either
    assert [w[0] for w in widths] == [3, 3]
    assert sum(w[1] for w in widths) / sum(w[2] for w in widths) > 0.9
    assert list(ev.table["prompt"]) == [p for ps in sets.values() for p in ps]
    assert list(ev.table["category"]) == ["harmful"] * 4 + ["benign"] * 2
    monkeypatch.setattr(ev_mod, "generate_batch", real)
    for i, (cat, p) in enumerate(zip(ev.table["category"], ev.table["prompt"])):
        alone = wb.evaluate_refusal(tiny_model, {cat: [p]}, max_new_tokens=5, batch_size=1, show_progress=False,
                                    keep_logprobs=True)
        assert alone.table["reply"][0] == ev.table["reply"][i]
        assert torch.allclose(alone.logprobs[0], ev.logprobs[i], atol=1e-4)
    replies = wb.generate(tiny_model, [p for ps in sets.values() for p in ps], max_new_tokens=5, batch_size=3,
                          show_progress=False)
    assert replies == list(ev.table["reply"])


def test_vocabulary_names_real_bridge_hooks(tiny_model):
    """Every site of the one hook vocabulary is a hook the TransformerBridge really exposes, on every layer, and
    the modules that name hooks take them from it."""
    from workbench import vocab
    from workbench.patching.sites import hook_name as patch_hook
    from workbench.steering.hooks import hook_name as steer_hook
    from workbench.store.spec import ALIASES

    names = set(tiny_model.hook_dict)
    for site in vocab.SITES:
        for layer in range(int(tiny_model.cfg.n_layers)):
            assert vocab.hook_name(site, layer) in names, vocab.hook_name(site, layer)
    assert vocab.hook_name("mlp_post", 1) == "blocks.1.mlp.hook_post"
    assert vocab.hook_suffix("resid_pre") == "hook_resid_pre"
    assert patch_hook("z", 1) == vocab.hook_name("z", 1) and steer_hook("resid_post", 0) == "blocks.0.hook_resid_post"
    assert ALIASES == {k: v for k, v in vocab.SITES.items() if k != "z"}
    with pytest.raises(WorkbenchError, match="unknown hook site 'resid'"):
        vocab.hook_name("resid", 0)


def test_one_jsonl_reader_for_prompts_pairs_and_benchmarks(tmp_path):
    """Prompt files, pair files and benchmark copies go through one parser: the same clear errors everywhere."""
    from workbench.data import read_jsonl
    from workbench.datasets import load_prompts
    from workbench.patching.pairs import read_pairs

    good = tmp_path / "pairs.jsonl"
    good.write_text('{"clean": "a", "corrupted": "b"}\n\n{"clean": "c", "corrupted": "d"}\n', encoding="utf-8")
    assert read_pairs(good) == (["a", "c"], ["b", "d"]) and read_pairs(good, limit=1) == (["a"], ["b"])
    assert read_jsonl(good) == [{"clean": "a", "corrupted": "b"}, {"clean": "c", "corrupted": "d"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a", "corrupted": "b"}\n{oops\n', encoding="utf-8")
    for call in (lambda: read_pairs(bad), lambda: read_jsonl(bad), lambda: load_prompts(str(bad), column="clean")):
        with pytest.raises(WorkbenchError, match=r"bad\.jsonl:2 is not valid JSON"):
            call()
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"clean": "a"}\n', encoding="utf-8")
    with pytest.raises(WorkbenchError, match="row 1 must be an object with 'clean' and 'corrupted' keys"):
        read_pairs(keyless)
    with pytest.raises(WorkbenchError, match="pair file .*missing.jsonl' does not exist"):
        read_pairs(tmp_path / "missing.jsonl")


def test_vocabulary_categories_are_defined_once():
    """The category and split names live in workbench.vocab; data, the organism corpus, steering and the plots
    use those tuples themselves."""
    from workbench import data, vocab
    from workbench.organism import corpus
    from workbench.steering import compare

    assert vocab.CATEGORIES == ("harmful", "jailbreak", "benign", "borderline") and "harmless" not in vocab.CATEGORIES
    assert vocab.SPLITS == ("train", "val", "test")
    assert set(vocab.HARMFUL_LIKE) | set(vocab.BENIGN_LIKE) == set(vocab.CATEGORIES)
    assert not set(vocab.HARMFUL_LIKE) & set(vocab.BENIGN_LIKE)
    assert data.CATEGORIES is vocab.CATEGORIES and data.SPLITS is vocab.SPLITS and corpus.SPLITS is vocab.SPLITS
    assert corpus.CATEGORIES is vocab.ORGANISM_CATEGORIES and set(corpus.CATEGORIES) - set(vocab.CATEGORIES) == {"impossible"}
    assert compare.HARMFUL_LIKE is vocab.HARMFUL_LIKE and compare.BENIGN_LIKE is vocab.BENIGN_LIKE


def test_positions_one_spelling():
    """normalize_positions: the canonical spelling of every accepted form (old aliases included), and one
    clear error for the rest."""
    from workbench.vocab import normalize_positions

    assert normalize_positions("last") == "last" and normalize_positions(" ALL ") == "all"
    assert normalize_positions("post") == normalize_positions("post_instruction") == "post_instruction"
    assert normalize_positions("last_k(3)") == normalize_positions(("last_k", 3)) == ("last_k", 3)
    assert normalize_positions(-2) == (-2,) and normalize_positions([-1, -3, -1]) == (-3, -1)
    assert normalize_positions(range(-2, 0)) == (-2, -1)
    for bad, msg in (("first", "unknown positions 'first'; positions must be"), ([0, -1], "must be negative"),
                     (("last_k", 0), "k must be >= 1"), (("last_k", "2"), "k must be an int"), ([], "unknown"),
                     (1.5, "unknown positions 1.5"), ([True], "unknown")):
        with pytest.raises(WorkbenchError, match=msg):
            normalize_positions(bad)


def test_resolve_positions_offsets_and_labels():
    from workbench.vocab import resolve_positions

    assert resolve_positions("last") == ([-1], "last")
    assert resolve_positions("post_instruction", 5) == ([-5, -4, -3, -2, -1], "post_instruction")
    assert resolve_positions("post", 4) == ([-4, -3, -2, -1], "post_instruction")
    assert resolve_positions(("last_k", 2)) == ([-2, -1], "last_k(2)")
    assert resolve_positions([-1, -3]) == ([-3, -1], "[-3,-1]") and resolve_positions(-2) == ([-2], "[-2]")
    assert resolve_positions("all") == ("all", "all")
    with pytest.raises(WorkbenchError, match="need the number of post-instruction tokens"):
        resolve_positions("post_instruction")


def test_position_offsets_of_cached_columns():
    from workbench.vocab import position_offsets

    assert position_offsets("all", 3) == [-3, -2, -1] and position_offsets(None, 2) == [-2, -1]
    assert position_offsets("post_instruction", 4) == [-4, -3, -2, -1]
    assert position_offsets([-5, -1], 2) == [-5, -1] and position_offsets("last", 1) == [-1]


def test_position_index_selects_the_same_columns_as_the_offsets():
    from workbench.vocab import position_index, resolve_positions

    x = torch.arange(6)
    for spec, n_post in (("all", None), ("last", None), ("post", 3), (("last_k", 2), None), ([-4, -2], None),
                         ([-3, -2, -1], None)):
        offsets, _ = resolve_positions(spec, n_post)
        want = x if offsets == "all" else x[offsets]
        assert torch.equal(x[position_index(spec, n_post)], want), spec
    assert position_index("last") == slice(-1, None)  # a slice: also fits a cached decoding step of length 1
    assert torch.equal(x[:1][position_index(("last_k", 4))], x[:1])
    assert position_index([-4, -2]) == [-4, -2]


def test_as_vector_is_the_one_direction_coercion(tiny_model):
    """Direction / tensor / per-layer set -> one vector (of a layer, unit on request); the interventions, the
    sparsity analyses and steering take their vectors from it, with the same errors."""
    from workbench.directions import Direction, interventions
    from workbench.directions.artifact import as_vector, unit
    from workbench.sparsity.direction import direction_vector

    d = int(tiny_model.cfg.d_model)
    stack = torch.randn(3, d)
    per_layer = Direction.from_vector(tiny_model, stack, None, -1, "pca", meta={"layers": [0, 1, 2]})
    assert torch.equal(as_vector(per_layer, tiny_model, layer=1), stack[1])
    assert torch.equal(as_vector(stack, layer=2), stack[2]) and torch.equal(as_vector(stack[:1]), stack[0])
    u = as_vector(per_layer, layer=0, normalize=True)
    assert u.dtype == torch.float32 and torch.allclose(u, stack[0] / stack[0].norm())
    assert torch.equal(per_layer.unit, unit(stack)) and interventions.as_vector is as_vector
    assert torch.equal(direction_vector(per_layer, layer=1), stack[1].double())
    for bad, kw, msg in ((per_layer, {}, r"holds 3 vectors .*shape \(d_model,\)"), (torch.ones(2, 2, 2), {}, "shape"),
                         (torch.zeros(d), {"nonzero": True}, "zero vector"),
                         (torch.zeros(d), {"normalize": True}, "zero direction"),
                         (torch.ones(5), {"d_model": d}, f"d_model=5 but the model has d_model={d}"),
                         (torch.ones(5), {"model": tiny_model}, f"d_model={d}"),
                         (torch.full((d,), float("nan")), {}, "NaN"), ("r", {}, "expected a Direction or a tensor"),
                         (stack, {"layer": 3}, "layer 3 is out of range")):
        with pytest.raises(WorkbenchError, match=msg):
            as_vector(bad, **kw)


def test_check_layers_is_the_one_layer_validator(tiny_model):
    """vocab.check_layers: None = every layer, negative layers only where asked, the same messages from the
    store's hook specs, the sparsity analyses and the direction interventions."""
    from workbench import directions as wd
    from workbench import sparsity as ws
    from workbench.store.spec import resolve_hooks
    from workbench.vocab import check_layers

    n = int(tiny_model.cfg.n_layers)
    assert check_layers(None, 3) == [0, 1, 2] and check_layers(1, 3) == [1] and check_layers([2, 0, 2], 3) == [2, 0, 2]
    assert check_layers([-1, 0, 2], 3, negative=True, sort=True) == [0, 2]
    for bad, kw, msg in ((-1, {}, "layer -1 is out of range; the model has 3 layers"),
                         ([3], {"negative": True}, "layer 3 is out of range"), ([], {}, "layer set is empty"),
                         (["1"], {}, "layer '1' is not an int"), ([True], {}, "is not an int"),
                         ([5], {"context": "spec x"}, "^spec x: layer 5 is out of range")):
        with pytest.raises(WorkbenchError, match=msg):
            check_layers(bad, 3, **kw)
    calls = (lambda: resolve_hooks(tiny_model, ("resid_pre", [n])), lambda: ws.topk_hooks(tiny_model, 1, layers=[n]),
             lambda: wd.actadd_hooks(tiny_model, torch.ones(int(tiny_model.cfg.d_model)), layers=[n]))
    for call in calls:
        with pytest.raises(WorkbenchError, match=f"layer {n} is out of range; the model has {n} layers"):
            call()


def test_one_diff_in_means_for_directions_and_patching():
    """The patching analyses' clean-minus-corrupted direction is the directions' difference in means (one
    implementation), at the last position, made unit."""
    from types import SimpleNamespace

    from workbench.directions import MemoryEntry, diff_in_means
    from workbench.patching.run import diff_in_means as patching_diff_in_means

    gen = torch.Generator().manual_seed(0)
    name = "blocks.1.hook_resid_pre"
    clean, corrupted = torch.randn(5, 3, 8, generator=gen), torch.randn(4, 3, 8, generator=gen)
    runs = SimpleNamespace(clean=SimpleNamespace(acts={name: clean}), corrupted=SimpleNamespace(acts={name: corrupted}))
    want = clean[:, -1].double().mean(0) - corrupted[:, -1].double().mean(0)
    assert torch.allclose(patching_diff_in_means(runs, 1).double(), want / want.norm(), atol=1e-6)
    c = diff_in_means(MemoryEntry({name: clean}, [-3, -2, -1], shard_rows=2), MemoryEntry({name: corrupted}, [-3, -2, -1]))
    assert torch.allclose(c.vector(1, -1), want, atol=1e-12) and c.n_harmful == 5 and c.n_benign == 4
    same = SimpleNamespace(clean=runs.clean, corrupted=runs.clean)
    with pytest.raises(WorkbenchError, match="coincide"):
        patching_diff_in_means(same, 1)
