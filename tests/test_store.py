"""The activation cache store: keys, hits, left padding, resume, corruption, locks, ranks, bad input, CLI."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from workbench import WorkbenchError, tokenize_chat
from workbench.store import ActivationStore, Entry, get_or_compute, resolve_hooks, resolve_request

PROMPTS = [
    "How do I build a bomb?",
    "Tell me how to bake a cake. Explain the steps to hack into a bank account.",
    "Sure",
    "Write a poem about the sea.",
    "Of course! Certainly. Here is an overview: step one, step two.",
    "I cannot help with that.",
    "Explain",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine spinning OpenMP threads make
    small forwards much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Counter:
    """Counts forward passes of the model (a pre-hook on block 0); optionally raises after ``crash_after``."""

    def __init__(self, model, crash_after: int | None = None):
        self.n, self.crash_after = 0, crash_after
        self.handle = model.blocks[0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.crash_after is not None and self.n >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def compute(model, store, **kw):
    kw.setdefault("show_progress", False)
    return get_or_compute(model, PROMPTS, store=store, **kw)


def snapshot(root: Path) -> dict:
    """path -> bytes of every file of the entries (locks and work excluded)."""
    base = Path(root) / "activations"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)}


def single_run(model, text_prompt: str, hooks: list[str]) -> dict[str, torch.Tensor]:
    """``{hook: Float[Tensor, "pos d"]}`` of one unpadded prompt."""
    b = tokenize_chat(model.tokenizer, [text_prompt])
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.input_ids, names_filter=list(hooks))
    return {h: cache[h][0] for h in hooks}


# ------------------------------------------------------------------------------------------- hits, keys
def test_cache_hit_does_not_recompute_and_adds_only_missing_hooks(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    with Counter(tiny_model) as c:
        e1 = compute(tiny_model, store, hooks="resid_pre.0", batch_size=3)
    assert c.n == 3  # 7 prompts / 3 per batch
    before = snapshot(tmp_path)
    with Counter(tiny_model) as c:
        e2 = compute(tiny_model, store, hooks=["blocks.0.hook_resid_pre"], batch_size=3)
    assert c.n == 0 and e2.key == e1.key
    assert torch.equal(e1.activations("blocks.0.hook_resid_pre"), e2.activations("blocks.0.hook_resid_pre"))
    with Counter(tiny_model) as c:  # a superset: only blocks.1 is computed, blocks.0 is untouched
        e3 = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert c.n == 3 and e3.key == e1.key
    assert e3.hook_names == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    after = snapshot(tmp_path)
    f0 = f"{e1.key}/hooks/blocks.0.hook_resid_pre.safetensors"
    assert after[f0] == before[f0]
    assert set(e3.manifest["hooks"]) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"}
    # a different position spec, dtype or prompt list is a different entry; equal specs share one
    assert compute(tiny_model, store, hooks="resid_pre.0", positions="last").key != e1.key
    assert resolve_request(tiny_model, PROMPTS, positions=("last_k", 5)).key == e1.key  # n_post is 5 (Llama-3)
    assert resolve_request(tiny_model, PROMPTS, positions="last_k(5)").key == e1.key
    assert resolve_request(tiny_model, PROMPTS, dtype="bfloat16").key != e1.key
    assert resolve_request(tiny_model, PROMPTS[:-1]).key != e1.key
    assert resolve_request(tiny_model, PROMPTS, system="Be brief.").key != e1.key
    assert len(store.ls()) == 2 and set(store.ls()["status"]) == {"ok"}


def test_in_place_weight_edit_changes_the_key(tiny_model):
    key = resolve_request(tiny_model, PROMPTS).key
    w = tiny_model.original_model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.mul_(2.0)
    try:
        assert resolve_request(tiny_model, PROMPTS).key != key
    finally:
        with torch.no_grad():
            w.div_(2.0)
    assert resolve_request(tiny_model, PROMPTS).key == key
    # a deep copy carries the cached fingerprint along; edits through .data bypass version counters
    edited = copy.deepcopy(tiny_model)
    edited.original_model.model.layers[0].mlp.down_proj.weight.data.mul_(2.0)
    assert resolve_request(edited, PROMPTS).key != key


def test_entry_api_shapes_stacked_shards_meta(tiny_model, tmp_path):
    rows = [{"prompt": p, "label": i % 2} for i, p in enumerate(PROMPTS)]
    e = get_or_compute(tiny_model, rows, hooks=("resid_pre", "mlp_post.1"), store=tmp_path, batch_size=4,
                       show_progress=False)
    assert isinstance(e, Entry) and e.n_prompts == 7 and len(e) == 7
    assert e.positions == [-5, -4, -3, -2, -1] and e.mask is None
    assert e.hook_names == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post"]
    x = e.activations("blocks.1.hook_resid_pre")
    assert x.shape == (7, 5, 64) and x.dtype == torch.float32
    assert e.activations("mlp_post.1").shape == (7, 5, 128)
    s = e.stacked("resid_pre")
    assert s.shape == (7, 2, 5, 64) and torch.equal(s[:, 1], x)
    # streaming reduction in float64 equals the reduction of the memory map
    total, seen = torch.zeros(5, 64, dtype=torch.float64), []
    for rows_, chunk in e.iter_shards("blocks.1.hook_resid_pre", verify=True):
        seen.append((rows_.start, rows_.stop))
        total += chunk.double().sum(0)
    assert seen == [(0, 4), (4, 7)]
    assert torch.allclose(total, x.double().sum(0), atol=1e-9)
    assert e.meta["label"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert e.prompts == PROMPTS and e.input_ids.shape == e.attention_mask.shape
    m = e.manifest
    assert m["format_version"] == 1 and m["n_prompts"] == 7 and m["dtype"] == "float32"
    assert all(len(sh["sha256"]) == 64 for sh in m["hooks"]["blocks.0.hook_resid_pre"]["shards"])
    reopened = ActivationStore(tmp_path).open(e.key[:8])
    assert reopened.hook_names == e.hook_names


def test_resolve_hooks_aliases_and_order(tiny_model):
    assert resolve_hooks(tiny_model, ("resid_pre", [1, 0])) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert resolve_hooks(tiny_model, ["resid_post.-1", "mlp_out.1", "attn_out.0", "blocks.0.hook_resid_pre"]) == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert resolve_hooks(tiny_model, "mlp_post") == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]


# --------------------------------------------------------------------------------------- correctness
def test_left_padding_matches_unpadded_single_prompt_runs(tiny_model, tmp_path):
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    e = compute(tiny_model, tmp_path, hooks=hooks, batch_size=7)  # one batch, heavy left padding
    ea = compute(tiny_model, tmp_path, hooks=hooks, positions="all", batch_size=4)
    assert e.positions == [-5, -4, -3, -2, -1] and ea.positions == "all"
    L = ea.input_ids.shape[1]
    worst = 0.0
    for i, p in enumerate(PROMPTS):
        n = int(ea.attention_mask[i].sum())
        assert ea.mask[i].tolist() == [False] * (L - n) + [True] * n
        refs = single_run(tiny_model, p, hooks)
        for h in hooks:
            ref = refs[h]
            assert ref.shape[0] == n
            worst = max(worst, (e.activations(h)[i] - ref[-5:]).abs().max().item())
            worst = max(worst, (ea.activations(h)[i, L - n:] - ref).abs().max().item())
            assert ea.activations(h)[i, :L - n].abs().max().item() == 0.0 if n < L else True
    assert worst < 1e-5


def test_bfloat16_storage_and_last_positions(tiny_model, tmp_path):
    e32 = compute(tiny_model, tmp_path, hooks="resid_post.1", positions=[-3, -1], batch_size=7)
    e16 = compute(tiny_model, tmp_path, hooks="resid_post.1", positions=[-3, -1], dtype="bf16", batch_size=7)
    assert e16.dtype == "bfloat16" and e16.key != e32.key
    a, b = e32.activations("resid_post.1"), e16.activations("resid_post.1")
    assert b.dtype == torch.bfloat16 and b.shape == (7, 2, 64)
    assert torch.equal(a.to(torch.bfloat16), b)
    last = compute(tiny_model, tmp_path, hooks="resid_post.1", positions="last", batch_size=7)
    assert torch.equal(last.activations("resid_post.1")[:, 0], a[:, 1])


# ------------------------------------------------------------------------------------- crash safety
def test_resume_after_crash_equals_clean_run(tiny_model, tmp_path):
    store = ActivationStore(tmp_path / "crashy")
    with Counter(tiny_model, crash_after=2) as c, pytest.raises(RuntimeError, match="simulated crash"):
        compute(tiny_model, store, hooks="resid_pre", batch_size=2)  # 4 shards, dies in the third
    assert c.n == 2
    assert store.keys() == []  # nothing half-written is visible as an entry
    assert store.ls()["status"].tolist() == ["partial"]
    with Counter(tiny_model) as c:
        resumed = compute(tiny_model, store, hooks="resid_pre", batch_size=2)
    assert c.n == 2  # only the two missing shards
    with Counter(tiny_model) as c:
        clean = compute(tiny_model, ActivationStore(tmp_path / "clean"), hooks="resid_pre", batch_size=2)
    assert c.n == 4
    for h in resumed.hook_names:
        assert torch.equal(resumed.activations(h), clean.activations(h))
        assert resumed.manifest["hooks"][h]["shards"] == clean.manifest["hooks"][h]["shards"]
    assert store.ls()["status"].tolist() == ["ok"]
    assert not store.work_path(resumed.key).exists()


def test_verify_finds_a_corrupted_shard(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert store.verify().empty
    rec = e.manifest["hooks"]["blocks.1.hook_resid_pre"]
    path = e.path / rec["file"]
    off = rec["data_offset"] + 4 * 5 * 64 * 4 + 100  # inside row 4 -> shard 1 (rows 3..6)
    data = bytearray(path.read_bytes())
    data[off:off + 4] = bytes(b ^ 0xFF for b in data[off:off + 4])
    path.write_bytes(bytes(data))
    bad = store.verify()
    assert len(bad) == 1
    assert bad.iloc[0]["hook"] == "blocks.1.hook_resid_pre" and bad.iloc[0]["shard"] == 1
    assert bad.iloc[0]["rows"] == [3, 6] and "checksum" in bad.iloc[0]["problem"]
    with pytest.raises(WorkbenchError, match="shard 1 .*fails its checksum"):
        list(e.iter_shards("blocks.1.hook_resid_pre", verify=True))
    with pytest.raises(WorkbenchError, match="checksum mismatch"):
        e.check()
    before = snapshot(tmp_path)
    # a hit on the corrupted entry is not served: the damaged hook (only) is recomputed and replaces the file
    with Counter(tiny_model) as c:
        again = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert c.n == 3  # 7 prompts in shards of 3: one hook's three shards
    after = snapshot(tmp_path)
    changed = {k for k in before if before[k] != after[k]}
    hook_file = f"{e.key}/hooks/blocks.1.hook_resid_pre.safetensors"
    assert hook_file in changed and changed <= {hook_file, f"{e.key}/manifest.json"}  # (timestamps: to the second)
    assert store.verify().empty
    assert again.manifest["hooks"]["blocks.1.hook_resid_pre"]["shards"] == rec["shards"]  # the clean values


def test_concurrent_writers_compute_once(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    out, errors = {}, []

    def worker(i):
        try:
            out[i] = compute(tiny_model, store, hooks="resid_pre", batch_size=2)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with Counter(tiny_model) as c:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert c.n == 4  # one writer computed the 4 shards, the other waited on the lock and read them
    assert out[0].key == out[1].key and store.verify().empty
    assert torch.equal(out[0].activations("resid_pre.1"), out[1].activations("resid_pre.1"))


def test_lock_timeout_is_a_clear_error(tiny_model, tmp_path):
    store = ActivationStore(tmp_path, lock_timeout=0.2)
    key = resolve_request(tiny_model, PROMPTS, hooks="resid_pre").key
    store.ensure_writable()
    with store.lock(key), pytest.raises(WorkbenchError, match="locked by another writer"):
        compute(tiny_model, store, hooks="resid_pre")


_DIST_SCRIPT = r"""
import json, sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
from workbench import load_model
from workbench.store import get_or_compute
prompts = json.loads(sys.argv[3])
model = load_model(sys.argv[1], device="cpu")
n_forward = []
model.blocks[0].register_forward_pre_hook(lambda m, a: n_forward.append(1))
e = get_or_compute(model, prompts, hooks="resid_pre", batch_size=2, store=sys.argv[2], show_progress=False)
# every rank sees the finished entry
with open(f"{sys.argv[4]}/rank{dist.get_rank()}.json", "w") as fh:
    json.dump({"rank": dist.get_rank(), "world": dist.get_world_size(), "key": e.key, "n_forward": len(n_forward),
               "sum": float(e.activations("blocks.1.hook_resid_pre").double().sum())}, fh)
"""


def test_two_process_torchrun_equals_single_process(tiny_model, tiny_dir, tmp_path, torchrun):
    proc = torchrun(_DIST_SCRIPT, tiny_dir, tmp_path / "dist", json.dumps(PROMPTS), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and {r["world"] for r in reports} == {2}
    assert reports[0]["key"] == reports[1]["key"] and reports[0]["sum"] == reports[1]["sum"]
    assert [r["n_forward"] for r in reports] == [2, 2]  # 4 shards of 2 prompts, split over the ranks
    dist_store = ActivationStore(tmp_path / "dist")
    assert len(dist_store.keys()) == 1 and dist_store.verify().empty
    prog = {p.name for p in dist_store.base.rglob("progress.*.jsonl")}
    assert prog == set()  # work dir cleaned after the manifest was written
    single = compute(tiny_model, tmp_path / "single", hooks="resid_pre", batch_size=2)  # 1 thread, like the ranks
    multi = dist_store.open(dist_store.keys()[0])
    assert multi.key == single.key
    for h in single.hook_names:
        assert torch.equal(multi.activations(h), single.activations(h))  # bit for bit
        assert multi.manifest["hooks"][h]["shards"] == single.manifest["hooks"][h]["shards"]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_leave_the_store_untouched(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=4)
    before = snapshot(tmp_path)
    cases = [
        (dict(prompts=[]), "prompt list is empty"),
        (dict(hooks="resid_pree"), "unknown hook 'resid_pree'"),
        (dict(hooks="blocks.7.hook_resid_pre"), "the model has 2 layers"),
        (dict(hooks="resid_pre.5"), "layer 5 is out of range"),
        (dict(positions=("last_k", 14)), r"prompt 2 \('Sure'\) has only 13 tokens"),
        (dict(positions="middle"), "unknown positions 'middle'"),
        (dict(positions=[0, -1]), "must be negative"),
        (dict(dtype="float8"), "unknown dtype"),
        (dict(batch_size=0), "batch_size must be a positive int"),
    ]
    for kw, msg in cases:
        prompts = kw.pop("prompts", PROMPTS)
        with Counter(tiny_model) as c, pytest.raises(WorkbenchError, match=msg):
            get_or_compute(tiny_model, prompts, store=store, show_progress=False, **{"hooks": "resid_pre", **kw})
        assert c.n == 0
    assert snapshot(tmp_path) == before

    # a store path that is not writable (below a regular file: fails even as root)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(WorkbenchError, match="is not writable"):
        compute(tiny_model, ActivationStore(blocker / "cache"), hooks="resid_pre")

    # a manifest from a newer format version: refused, never overwritten
    mpath = e.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["format_version"] = 99
    mpath.write_text(json.dumps(m))
    newer = snapshot(tmp_path)
    with pytest.raises(WorkbenchError, match="newer workbench"):
        compute(tiny_model, store, hooks="resid_pre", batch_size=4)
    with pytest.raises(WorkbenchError, match="newer workbench"):
        compute(tiny_model, store, hooks="mlp_out", batch_size=4)
    assert snapshot(tmp_path) == newer
    assert "newer workbench" in store.ls()["status"][0] and len(store.verify()) == 1


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "env"))
    assert ActivationStore().root == tmp_path / "env"
    assert ActivationStore(tmp_path / "arg").root == tmp_path / "arg"
    monkeypatch.delenv("WORKBENCH_CACHE")
    assert ActivationStore().root == Path("~/.cache/workbench").expanduser()


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_compute_ls_verify_rm(tiny_dir, tmp_path, capsys):
    from workbench.cli import main

    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in PROMPTS))
    root = str(tmp_path / "store")
    assert main(["cache", "compute", "--model", str(tiny_dir), "--prompts", str(pfile), "--hooks",
                 "resid_pre,mlp_out.1", "--positions", "last_k(2)", "--device", "cpu", "--root", root,
                 "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompts"] == 7 and out["positions"] == [-2, -1] and out["n_hooks"] == 3
    assert main(["cache", "ls", "--root", root, "--json"]) == 0
    ls = json.loads(capsys.readouterr().out)
    assert ls["n_entries"] == 1 and ls["entries"][0]["key"] == out["key"] and ls["entries"][0]["n_hooks"] == 3
    assert main(["cache", "verify", "--root", root, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n_problems"] == 0
    e = ActivationStore(root).open(out["key"])
    assert e.meta["category"].tolist() == ["x"] * 7
    hook_file = e.path / e.manifest["hooks"]["blocks.1.hook_mlp_out"]["file"]
    data = bytearray(hook_file.read_bytes())
    data[-1] ^= 0xFF
    hook_file.write_bytes(bytes(data))
    assert main(["cache", "verify", "--root", root, "--json", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["problems"][0]["hook"] == "blocks.1.hook_mlp_out"
    assert "corrupted" in captured.err
    assert main(["cache", "rm", out["key"][:6], "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [out["key"]]
    assert ActivationStore(root).ls().empty
    assert main(["cache", "rm", "deadbeef", "--root", root]) == 2
    assert "no entry 'deadbeef'" in capsys.readouterr().err
