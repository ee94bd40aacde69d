"""Decoding options (workbench.decoding): seeded sampling checked against the model's own softmax, the nucleus
against a hand computation, and sampled replies independent of batching."""

import json
from collections import Counter

import pytest
import torch

from workbench.decoding import GREEDY, Decoding, gumbel, nucleus_mask, sample
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def organism():
    from workbench import load_model

    return load_model()


@pytest.fixture(scope="module")
def data():
    from workbench.promptsets import load_data

    return load_data(None)


def test_nucleus_mask_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # cumulative mass before each token: 0, .5, .7, .85, .95 -> top_p .7 keeps the first two (.5 + .2 reaches .7)
    assert nucleus_mask(logits, 0.7).tolist() == [[False, False, True, True, True]]
    assert nucleus_mask(logits, 0.71).tolist() == [[False, False, False, True, True]]
    assert nucleus_mask(logits, 0.3).tolist() == [[False, True, True, True, True]]   # the top token always stays
    assert not nucleus_mask(logits, 1.0).any()
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert nucleus_mask(shuffled, 0.7).tolist() == [[True, False, True, True, False]]


def test_gumbel_noise_is_standard_gumbel_and_seeded():
    g = gumbel(123, 0, 200_000)
    assert torch.equal(g, gumbel(123, 0, 200_000)) and not torch.equal(g, gumbel(123, 1, 200_000))
    assert abs(float(g.mean()) - 0.5772) < 0.01          # Euler-Mascheroni constant
    assert abs(float(g.var()) - torch.pi ** 2 / 6) < 0.03


def test_decoding_validation():
    for bad in (dict(strategy="beam"), dict(strategy="sample", temperature=0), dict(strategy="sample", top_p=0),
                dict(strategy="sample", top_p=1.5), dict(strategy="sample", n_samples=0), dict(n_samples=2)):
        with pytest.raises(WorkbenchError):
            Decoding(**bad)
    assert not GREEDY.sampling and sample().sampling and sample().temperature == 0.7 and sample().top_p == 0.9


def test_first_token_frequencies_follow_the_softmax(organism, data):
    """400 samples of the first reply token against the temperature-scaled softmax of a plain forward."""
    from workbench.chat import tokenize_chat
    from workbench.generation import generate_batch

    prompt = data.prompts("test", "borderline")[0]
    batch = tokenize_chat(organism.tokenizer, [prompt])
    with torch.no_grad():
        probs = (organism(batch.input_ids)[0, -1].float() / 1.5).softmax(-1)
    n, counts = 400, Counter()
    for start in range(0, n, 100):
        rows = tokenize_chat(organism.tokenizer, [prompt] * 100)
        replies, _ = generate_batch(organism, rows, 1, decoding=sample(1.5, 1.0, seed=7), samples=range(start, start + 100))
        counts.update(organism.tokenizer(r, add_special_tokens=False)["input_ids"][0] if r else -1 for r in replies)
    top = probs.topk(3)
    assert float(top.values[0]) < 0.95     # a prompt with real uncertainty, else the test says little
    for p, tok in zip(top.values.tolist(), top.indices.tolist()):
        freq = counts[tok] / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 0.01, (tok, freq, p)


def test_sampled_replies_do_not_depend_on_batching(organism, data):
    from workbench.evaluate import evaluate_refusal
    from workbench.generation import generate

    sets = {c: data.prompts("test", c)[:5] for c in ("harmful", "benign", "jailbreak")}
    d = sample(0.9, 0.95, seed=3, n_samples=2)
    a = evaluate_refusal(organism, sets, decoding=d, batch_size=32, show_progress=False)
    b = evaluate_refusal(organism, sets, decoding=d, batch_size=3, show_progress=False)
    c = evaluate_refusal(organism, sets, decoding=d, batch_size="auto", show_progress=False)
    assert len(a.table) == 30 and a.table["sample"].tolist() == [0, 1] * 15
    assert a.table["reply"].tolist() == b.table["reply"].tolist() == c.table["reply"].tolist()
    assert a.table.attrs["decoding"]["seed"] == 3
    assert a.summary()["n"] == {"harmful": 10, "benign": 10, "jailbreak": 10}
    one = generate(organism, sets["jailbreak"][:2], decoding=d, show_progress=False)
    assert one == [a.table["reply"].tolist()[20:22], a.table["reply"].tolist()[22:24]]
    other_seed = evaluate_refusal(organism, sets, decoding=sample(0.9, 0.95, seed=4, n_samples=2), show_progress=False)
    assert other_seed.table["reply"].tolist() != a.table["reply"].tolist()
    greedy = evaluate_refusal(organism, sets, show_progress=False)
    assert "sample" not in greedy.table and greedy.table.attrs["decoding"]["strategy"] == "greedy"


def test_evaluate_cli_samples(capsys):
    from workbench.cli import main

    assert main(["evaluate", "--limit", "2", "--categories", "harmful,benign", "--strategy", "sample",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--n-samples", "3", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == {"harmful": 6, "benign": 6}
    assert out["decoding"] == {"strategy": "sample", "temperature": 0.8, "top_p": 0.9, "seed": 5, "n_samples": 3}
    assert main(["evaluate", "--limit", "2", "--n-samples", "3", "--json", "--quiet"]) == 2
    assert "greedy decoding has one reply per prompt" in capsys.readouterr().err
