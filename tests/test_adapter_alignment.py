"""The adapter's write maps against an independent path: what a Hugging Face forward actually changes.

On a tiny random Llama (4 heads sharing 2 key-value heads), an adapter on one projection is given random factors;
with the same input to the layer, the change it makes to the attention (``v_proj``) or MLP (``down_proj``)
output must lie in the column space of :func:`residual_write_maps`'s map, and the energy share and subspace
cosine are checked against numbers worked out by hand.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from workbench.adapter_alignment import residual_write_maps, upstream_summary, write_alignment
from workbench.errors import WorkbenchError
from workbench.lora import Adapter, LoRAConfig, adapter_tensors, attach_lora


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _module_outputs(model, module_name, ids):
    out = {}
    module = model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda m, i, o: out.__setitem__("o", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return out["o"].reshape(-1, out["o"].shape[-1])


@pytest.mark.parametrize("target,module", [("v_proj", "model.layers.1.self_attn"), ("down_proj", "model.layers.1.mlp")])
def test_the_forward_changes_only_inside_the_write_subspace(tiny_dir, target, module):
    cfg_json = json.loads((tiny_dir / "config.json").read_text())
    assert cfg_json["num_key_value_heads"] < cfg_json["num_attention_heads"]  # grouped-query attention exercised
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    model = _hf(tiny_dir)
    before = _module_outputs(model, module, ids)
    cfg = LoRAConfig(rank=2, alpha=4.0, targets=(target,), layers=(1,))
    wrappers = attach_lora(model, cfg, seed=1)
    torch.manual_seed(2)
    for w in wrappers.values():
        w.lora_B.data.normal_(0, 0.5)
    change = _module_outputs(model, module, ids) - before
    assert change.norm() > 1e-2
    maps = residual_write_maps(Adapter(adapter_tensors(wrappers), cfg), load_file(str(tiny_dir / "model.safetensors")),
                               cfg_json["num_attention_heads"], cfg_json["num_key_value_heads"])
    (key,) = maps
    assert key == (1, target)
    d = cfg_json["hidden_size"]
    u, s, _ = torch.linalg.svd(maps[key].double(), full_matrices=False)
    basis = u[:, s > 1e-6 * s.max()]
    expected_rank = 2 * cfg_json["num_attention_heads"] if target == "v_proj" else 2
    assert basis.shape[1] == expected_rank < d
    outside = change.double() - (change.double() @ basis) @ basis.T
    assert outside.norm() / change.norm() < 1e-5
    # a direction orthogonal to the subspace sees no change, and the table says so
    g = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    orth = g - basis @ (basis.T @ g)
    assert (change.double() @ orth).abs().max() / change.norm() < 1e-5
    row = write_alignment(maps, orth).iloc[0]
    assert row["energy_share"] < 1e-10 and row["subspace_cos"] < 1e-6
    assert row["subspace_chance"] == pytest.approx((expected_rank / d) ** 0.5)


def test_energy_share_and_subspace_cosine_by_hand():
    m = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0], [0.0, 0.0]])  # writes e0 (norm 3) and e1 (norm 4)
    maps = {(0, "down_proj"): m}
    along = write_alignment(maps, torch.tensor([1.0, 0, 0, 0])).iloc[0]
    assert along["energy_share"] == pytest.approx(9 / 25) and along["subspace_cos"] == pytest.approx(1.0)
    assert along["energy_chance"] == 0.25 and along["energy_vs_chance"] == pytest.approx(9 / 25 * 4)
    assert along["rank"] == 2 and along["subspace_chance"] == pytest.approx(0.5 ** 0.5)
    half = write_alignment(maps, torch.tensor([2.0, 0, 2.0, 0])).iloc[0]  # unnormalised on purpose
    assert half["energy_share"] == pytest.approx(9 / 50) and half["subspace_cos"] == pytest.approx(0.5 ** 0.5)
    # a layer with two maps gets an "all direct" row over both
    maps[(0, "o_proj")] = torch.tensor([[0.0], [0.0], [5.0], [0.0]])
    table = write_alignment(maps, torch.tensor([0.0, 0, 1.0, 0]))
    both = table[table["projection"] == "all direct"].iloc[0]
    assert both["energy_share"] == pytest.approx(25 / 50) and both["rank"] == 3


def test_chance_level_is_the_mean_over_random_directions():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(16, 5, generator=gen)
    shares = [write_alignment({(0, "down_proj"): m}, torch.randn(16, generator=gen)).iloc[0]["energy_share"]
              for _ in range(600)]
    assert sum(shares) / len(shares) == pytest.approx(1 / 16, rel=0.12)


def test_upstream_summary_keeps_the_layers_before_the_read_point():
    maps = {(0, "down_proj"): torch.tensor([[1.0], [0.0]]), (1, "down_proj"): torch.tensor([[0.0], [1.0]]),
            (2, "down_proj"): torch.tensor([[0.0], [3.0]])}
    table = write_alignment(maps, torch.tensor([1.0, 0.0]))
    up = upstream_summary(table, read_layer=2)
    assert up["down_proj"]["layers"] == [0, 1] and up["down_proj"]["energy_share"] == pytest.approx(0.5)
    assert up["down_proj"]["energy_vs_chance"] == pytest.approx(1.0)
    assert upstream_summary(table, None)["all direct"]["energy_share"] == pytest.approx(1 / 11)


def test_bad_inputs_fail_clearly():
    maps = {(0, "down_proj"): torch.ones(4, 2)}
    with pytest.raises(WorkbenchError, match="zero or not finite"):
        write_alignment(maps, torch.zeros(4))
    with pytest.raises(WorkbenchError, match="writes 4 dimensions"):
        write_alignment(maps, torch.ones(3))
    with pytest.raises(WorkbenchError, match="cannot share"):
        residual_write_maps(Adapter({}, LoRAConfig()), {}, 4, 3)


def test_cli_reports_a_tuned_models_alignment(tiny_dir, tmp_path, monkeypatch, capsys):
    from workbench import model_registry
    from workbench.cli import main
    from workbench.directions.artifact import Direction
    from workbench.lora import save_adapter

    cfg = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj"), layers=(0, 1))
    wrappers = attach_lora(_hf(tiny_dir), cfg, seed=1)
    for w in wrappers.values():
        w.lora_B.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    path = save_adapter(tmp_path / "a.safetensors", wrappers, cfg)
    monkeypatch.setitem(model_registry.TUNED, "tiny-tuned",
                        model_registry.TunedModel("tiny-tuned", str(tiny_dir), path, "n/a"))
    # the direction is a column of layer 0's down_proj write: all of it lies in that layer's write subspace
    b0 = wrappers["model.layers.0.mlp.down_proj"].lora_B.detach()[:, 0]
    Direction(b0.clone(), layer=1, position=-1, method="diff_in_means", fingerprint="x", d_model=64).save(tmp_path / "d")
    assert main(["organism", "alignment", "--model", "tiny-tuned", "--direction", str(tmp_path / "d.json"),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["read_layer"] == 1 and out["indirect"] == ["q_proj"]
    row0 = next(r for r in out["table"] if r["layer"] == 0)
    assert row0["projection"] == "down_proj" and row0["subspace_cos"] == pytest.approx(1.0, abs=1e-5)
    assert out["upstream"]["down_proj"]["layers"] == [0] and out["upstream"]["down_proj"]["energy_vs_chance"] > 1
    assert main(["organism", "alignment", "--model", "smollm2-135m-instruct", "--direction",
                 str(tmp_path / "d.json")]) != 0
    assert "is not a tuned model" in capsys.readouterr().err
