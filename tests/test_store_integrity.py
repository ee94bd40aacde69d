"""Integrity of the activation store on read, and its debris: flipped bytes in shards and headers, edited,
truncated, non-UTF-8 and incomplete manifests, damaged base files, a full disk, ``cache gc``, ``cache verify``
on a missing store. Every damaged read is one DamagedEntry naming the entry and the file; every hit on a damaged
entry is recomputed and reported as a ``store_recompute`` fallback."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time

import pytest
import torch
from test_store import _one_thread  # noqa: F401 - the same autouse fixture: one torch thread
from test_store import PROMPTS, Counter, compute, snapshot

from workbench import WorkbenchError
from workbench.fallbacks import recording_fallbacks
from workbench.store import ActivationStore, resolve_request
from workbench.store import fileio, integrity
from workbench.store.integrity import CHECKSUM_FIELD, DamagedEntry

H0, H1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
ROW = 5 * 64 * 4  # bytes of one row of resid_pre: 5 post-instruction positions x d_model 64, float32


def flip(path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def edit_manifest(entry_path, fn, seal: bool = False) -> dict:
    """Apply ``fn`` to the manifest and write it back as valid JSON (re-sealed, i.e. a consistent manifest, if
    ``seal``; else with the stale checksum, like a hand edit)."""
    path = entry_path / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    if seal:
        integrity.seal(m)
    path.write_text(json.dumps(m, indent=1))
    return m


def recompute(model, store, **kw):
    """get_or_compute of a (damaged) entry: ``(entry, forwards run, fallback events)``."""
    with recording_fallbacks() as events, Counter(model) as c:
        entry = compute(model, store, **kw)
    return entry, c.n, events


# ------------------------------------------------------------------------------------------- shard bytes
def test_flipped_shard_byte_fails_the_first_read_and_a_hit_recomputes_it(tiny_model, tmp_path, caplog):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    clean = {h: e.activations(h).clone() for h in e.hook_names}  # read (and checked) once in this process
    rec = e.manifest["hooks"][H1]
    path = e.path / rec["file"]
    flip(path, rec["data_offset"] + 4 * ROW + 100, 4)  # row 4: shard 1 (rows 3..6)
    # the file changed since it was checked, so it is checked again: no silent read of a corrupted shard
    with pytest.raises(DamagedEntry, match=rf"entry {e.key} is damaged: shard 1 \(rows 3\.\.6\) of {H1} fails its "
                                           rf"checksum .*\({re.escape(str(path))}\)"):
        e.activations(H1)
    fresh = ActivationStore(tmp_path).open(e.key)
    served = []
    with pytest.raises(DamagedEntry, match="shard 1 .*fails its checksum"):
        for rows, _ in fresh.iter_shards(H1):  # checked inline: shard 0 is served, shard 1 never is
            served.append(rows.start)
    assert served == [0]
    assert torch.equal(fresh.activations(H0), clean[H0])  # the other hook is sound

    # a zeroed byte (in the last shard) as well
    zero = bytearray(path.read_bytes())
    off = rec["data_offset"] + 6 * ROW + 8
    zero[off:off + 4] = b"\0\0\0\0"
    assert zero != path.read_bytes()
    path.write_bytes(bytes(zero))
    assert sorted(store.verify()["shard"].tolist()) == [1, 2]

    with caplog.at_level(logging.WARNING, logger="workbench"):
        again, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3  # only the damaged hook's 3 shards (every forward runs up to blocks.1)
    assert [ev["kind"] for ev in events] == ["store_recompute"]
    assert e.key in events[0]["message"] and f"recomputing {H1}" in events[0]["message"]
    assert any(r.levelno == logging.WARNING and "recomputing" in r.getMessage() for r in caplog.records)
    assert store.verify().empty
    for h in e.hook_names:
        assert torch.equal(again.activations(h), clean[h])


def test_files_are_hashed_once_per_process_and_again_when_they_change(tiny_model, tmp_path, monkeypatch):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    integrity.forget_all()  # as a new process would start
    hashed = []
    real_stream, real_sha = fileio.hash_stream, fileio.sha256
    monkeypatch.setattr(fileio, "hash_stream", lambda *a, **k: hashed.append("stream") or real_stream(*a, **k))
    monkeypatch.setattr(fileio, "sha256", lambda b: hashed.append("buf") or real_sha(b))
    compute(tiny_model, store, hooks="resid_pre", batch_size=3)  # a hit checks the two hook files: 2 x 3 shards
    assert hashed.count("stream") == 6
    hashed.clear()
    hit = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    hit.activations(H0)
    list(hit.iter_shards(H1))
    assert hit.prompts == PROMPTS and hit.input_ids.shape[0] == 7
    assert hashed == []  # nothing hashed again: one stat per read
    list(hit.iter_shards(H1, verify=True))  # verify=True: hashed again, inline
    assert hashed.count("buf") == 4  # the header and 3 shards
    hashed.clear()
    path = hit.path / hit.manifest["hooks"][H0]["file"]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten (same bytes): checked again
    hit.activations(H0)
    assert hashed.count("stream") == 3


# ---------------------------------------------------------------------------------------- header bytes
def test_flipped_header_bytes_fail_verify_and_reads(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    rec = e.manifest["hooks"][H0]
    path = e.path / rec["file"]
    original = path.read_bytes()
    head = original[:rec["data_offset"]]
    # a valid-JSON edit that only the header checksum sees: the positions in the header's metadata
    i = head.index(b"-5")
    path.write_bytes(original[:i + 1] + b"6" + original[i + 2:])
    bad = store.verify()
    assert bad["problem"].tolist() == ["the safetensors header fails its checksum"] and bad["hook"].tolist() == [H0]
    with pytest.raises(DamagedEntry, match=rf"entry {e.key} is damaged: {H0}: the safetensors header fails its "
                                           "checksum"):
        store.open(e.key).activations(H0)
    # the header length (first 8 bytes)
    path.write_bytes(original)
    flip(path, 1)
    assert "header says" in store.verify()["problem"][0]
    # an older manifest without the header checksum: the header is still compared with the manifest
    path.write_bytes(original)
    edit_manifest(e.path, lambda m: m["hooks"][H0].pop("header_sha256"), seal=True)
    assert store.verify().empty
    i = head.index(b'"F32"')
    path.write_bytes(original[:i] + b'"F16"' + original[i + 5:])
    with pytest.raises(DamagedEntry, match=r"the safetensors header describes .*'F16'.*, the manifest .*'F32'"):
        store.open(e.key).activations(H0)
    _, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3 and "header" in events[0]["message"] and store.verify().empty


# ------------------------------------------------------------------------------------------- manifests
_EDITS = {
    "n_prompts": lambda m: m.update(n_prompts=6),
    "positions": lambda m: m.update(positions=[-4, -3, -2, -1]),
    "fingerprint": lambda m: m["model"].update(fingerprint="0" * 16),
    "same-size shape": lambda m: m["hooks"][H0].update(shape=[7, 5, 8, 8]),
    "same-size dtype": lambda m: m["hooks"][H0].update(dtype="bfloat16", shape=[7, 5, 128]),
}


def test_edited_manifest_fails_its_checksum_everywhere(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    mpath = e.path / "manifest.json"
    original = mpath.read_bytes()
    assert CHECKSUM_FIELD in json.loads(original)
    for what, fn in _EDITS.items():
        edit_manifest(e.path, fn)
        with pytest.raises(DamagedEntry, match=rf"entry {e.key} is damaged: its manifest fails its checksum"):
            store.read_manifest(e.key)
        with pytest.raises(WorkbenchError, match="fails its checksum"):
            store.open(e.key)
        bad = store.verify()
        assert len(bad) == 1 and "manifest fails its checksum" in bad["problem"][0], what
        assert "fails its checksum" in store.ls()["status"][0], what
        mpath.write_bytes(original)
    assert store.verify().empty
    edit_manifest(e.path, _EDITS["n_prompts"])
    again, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3 and "manifest fails its checksum" in events[0]["message"] and "recomputing it" in events[0]["message"]
    assert again.n_prompts == 7 and store.verify().empty and store.ls()["status"].tolist() == ["ok"]


def test_old_manifest_without_checksum_is_accepted_with_a_warning_and_still_checked(tiny_model, tmp_path, caplog,
                                                                                     capsys):
    from workbench.cli import main

    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    mpath = e.path / "manifest.json"
    unsealed = json.loads(mpath.read_text())
    unsealed.pop(CHECKSUM_FIELD)
    mpath.write_text(json.dumps(unsealed))
    with caplog.at_level(logging.WARNING, logger="workbench.store"):
        assert store.read_manifest(e.key)["n_prompts"] == 7
    assert any("has no checksum" in r.getMessage() and e.key in r.getMessage() for r in caplog.records)
    assert store.ls()["status"].tolist() == ["ok (no manifest checksum)"]
    assert main(["cache", "verify", "--root", str(tmp_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_problems"] == 0 and out["no_manifest_checksum"] == [e.key]
    # edits the schema sees: rows vs n_prompts, positions vs shape, same-size shape vs the file's header
    for what, msg in [("n_prompts", "has 7 rows, but n_prompts is 6"),
                      ("positions", r"has 5 positions, but positions are \[-4, -3"),
                      ("same-size dtype", r"has dtype 'bfloat16', but the entry's dtype is 'float32'")]:
        mpath.write_text(json.dumps(unsealed))
        edit_manifest(e.path, _EDITS[what])
        with pytest.raises(DamagedEntry, match=msg):
            store.open(e.key)
    mpath.write_text(json.dumps(unsealed))
    edit_manifest(e.path, _EDITS["same-size shape"])
    with pytest.raises(DamagedEntry, match="the safetensors header describes"):
        store.open(e.key).activations(H0)
    # the fingerprint: only the request knows it; a hit compares, and recomputes
    mpath.write_text(json.dumps(unsealed))
    edit_manifest(e.path, _EDITS["fingerprint"])
    assert store.open(e.key).manifest["model"]["fingerprint"] == "0" * 16
    again, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3 and "has model fingerprint '0000000000000000'" in events[0]["message"]
    assert CHECKSUM_FIELD in again.manifest and store.ls()["status"].tolist() == ["ok"]


def test_manifest_without_hooks_or_files_is_a_clear_error(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    original = (e.path / "manifest.json").read_bytes()
    cases = [("hooks", lambda m: m.pop("hooks"), "its manifest has no 'hooks'"),
             ("files", lambda m: m.pop("files"), "its manifest has no 'files'"),
             ("shards", lambda m: m["hooks"][H1].pop("shards"), rf"hooks\['{H1}'\] has no 'shards'"),
             ("rows", lambda m: m["hooks"][H1]["shards"].pop(1), r"shard 1 is .*expected rows \[3, >3\]"),
             ("path", lambda m: m["files"]["tokens"].update(path="../../etc/passwd"), r"no valid files\['tokens'\]")]
    for what, fn, msg in cases:
        for seal in (True, False):  # a consistent manifest (schema) or a hand edit (checksum first)
            (e.path / "manifest.json").write_bytes(original)
            edit_manifest(e.path, fn, seal=seal)
            with pytest.raises(DamagedEntry, match=msg if seal else "fails its checksum"):
                store.open(e.key)
            assert re.search(msg if seal else "fails its checksum", store.ls()["status"][0]), what
            assert len(store.verify()) == 1
    _, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3 and events[0]["kind"] == "store_recompute" and store.verify().empty


def test_invalid_utf8_manifest_is_one_damaged_entry_for_ls_verify_and_compute(tiny_dir, tiny_model, tmp_path, capsys):
    from workbench.cli import main

    root = str(tmp_path)
    store = ActivationStore(root)
    good = compute(tiny_model, store, hooks="resid_pre.0", positions="last")
    bad = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    mpath = bad.path / "manifest.json"
    raw = mpath.read_bytes()
    i = raw.index(b'"name"')
    mpath.write_bytes(raw[:i + 2] + b"\xff" + raw[i + 3:])
    assert main(["cache", "ls", "--root", root, "--json"]) == 0
    ls = {r["key"]: r["status"] for r in json.loads(capsys.readouterr().out)["entries"]}
    assert ls[good.key] == "ok"
    assert re.match(rf"entry {bad.key} is damaged: its manifest is not valid UTF-8 \(byte 0xff at offset {i + 2}\)",
                    ls[bad.key])
    assert main(["cache", "verify", "--root", root, "--json", "--quiet"]) == 2
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["entries_checked"] == 2 and [p["key"] for p in out["problems"]] == [bad.key]
    assert "not valid UTF-8" in out["problems"][0]["problem"] and "Traceback" not in cap.err
    # the command that asks for it again recomputes it and says so in its JSON
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(PROMPTS) + "\n")
    assert main(["cache", "compute", "--model", str(tiny_dir), "--prompts", str(pfile), "--hooks", "resid_pre",
                 "--batch-size", "3", "--device", "cpu", "--root", root, "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key"] == bad.key and [f["kind"] for f in out["fallbacks"]] == ["store_recompute"]
    assert "not valid UTF-8" in out["fallbacks"][0]["message"]
    assert store.verify().empty


# ------------------------------------------------------------------------------------ truncated / base files
def test_truncated_and_damaged_files(tiny_model, tmp_path):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    hook = e.path / e.manifest["hooks"][H1]["file"]
    tokens, prompts = e.path / "tokens.safetensors", e.path / "prompts.jsonl"
    originals = {p: p.read_bytes() for p in (hook, tokens, prompts, e.path / "manifest.json")}

    def restore():
        for p, b in originals.items():
            p.write_bytes(b)

    hook.write_bytes(originals[hook][:-10])
    with pytest.raises(DamagedEntry, match=rf"{H1}: file size \d+ != \d+ bytes expected from the manifest "
                                           r"\(truncated or replaced\)"):
        store.open(e.key)
    assert store.verify()["hook"].tolist() == [H1]
    _, n, _ = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert n == 3 and store.verify().empty
    originals[hook] = hook.read_bytes()

    for path, what, read in [(tokens, "tokens", lambda x: x.input_ids), (prompts, "prompts", lambda x: x.meta)]:
        restore()
        path.write_bytes(originals[path][:len(originals[path]) // 2])
        with pytest.raises(DamagedEntry, match=rf"entry {e.key} is damaged: its {what} file fails its checksum "
                                               rf"\({re.escape(str(path))}\)"):
            read(store.open(e.key))
        assert f"{what} file checksum mismatch" in store.verify()["problem"].tolist()
        _, n, events = recompute(tiny_model, store, hooks="resid_pre", batch_size=3)  # the whole entry
        assert n == 3 and f"its {what} file fails its checksum" in events[0]["message"]
        assert store.verify().empty
        read(store.open(e.key))
        originals.update({p: p.read_bytes() for p in originals})

    # contents that match their (re-sealed) checksums but are not what they claim: still one clear error
    restore()
    tokens.write_bytes(b"not a safetensors file")
    edit_manifest(e.path, lambda m: m["files"]["tokens"].update(sha256=fileio.file_sha256(tokens)), seal=True)
    with pytest.raises(DamagedEntry, match="its tokens file is not readable safetensors"):
        store.open(e.key).input_ids
    restore()
    prompts.write_bytes(b'{"prompt": "\xff"}\n')
    edit_manifest(e.path, lambda m: m["files"]["prompts"].update(sha256=fileio.file_sha256(prompts)), seal=True)
    with pytest.raises(DamagedEntry, match="its prompts file is not UTF-8 JSON lines"):
        store.open(e.key).prompts
    restore()
    (e.path / "manifest.json").write_bytes(originals[e.path / "manifest.json"][:-40])
    with pytest.raises(DamagedEntry, match=r"its manifest is not valid JSON \(.* at line \d+ column \d+\)"):
        store.open(e.key)


# ------------------------------------------------------------------------------------------- full disk
def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def test_full_disk_while_writing_shards_is_one_error_and_cleans_up(tiny_model, tmp_path, monkeypatch):
    store = ActivationStore(tmp_path)
    real, writes = fileio.pwrite_all, []

    def pwrite(fd, buf, offset):
        writes.append(offset)
        if len(writes) > 3:
            raise _enospc()
        real(fd, buf, offset)

    monkeypatch.setattr(fileio, "pwrite_all", pwrite)
    with pytest.raises(WorkbenchError, match=r"no space left on device \(entry \w+ in the store .*: its 2 hook "
                                             r"file\(s\) need 0\.\d\d MiB, [\d.]+ MiB are free now\); the partial "
                                             r"work was removed"):
        compute(tiny_model, store, hooks="resid_pre", batch_size=3)
    assert len(writes) == 4
    assert _files(store.base) == set() and store.keys() == [] and store.ls().empty
    monkeypatch.undo()
    e = compute(tiny_model, store, hooks="resid_pre", batch_size=3)  # room again: computes normally
    assert store.verify().empty and e.n_prompts == 7


def test_full_disk_while_writing_a_manifest_leaves_no_temporary_and_the_entry_intact(tiny_model, tmp_path,
                                                                                  monkeypatch):
    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre.0", batch_size=3)
    clean = e.activations(H0).clone()
    before = _files(store.base)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".manifest.json."):
            raise _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WorkbenchError, match=r"no space left on device .*the partial work was removed"):
        compute(tiny_model, store, hooks="resid_pre", batch_size=3)  # adds blocks.1: the manifest write fails
    monkeypatch.undo()
    assert _files(store.base) == before  # no .manifest.json.<pid>.tmp, no unnamed hook file, no work
    assert store.verify().empty and torch.equal(store.open(e.key).activations(H0), clean)
    assert compute(tiny_model, store, hooks="resid_pre", batch_size=3).hook_names == [H0, H1]


# ------------------------------------------------------------------------------------------------- gc
def test_gc_removes_debris_but_never_what_a_writer_holds(tiny_model, tmp_path, capsys):
    from workbench.cli import main

    store = ActivationStore(tmp_path)
    e = compute(tiny_model, store, hooks="resid_pre.0", batch_size=3)
    clean = e.activations(H0).clone()
    for positions in ("last", "last_k(2)"):  # two interrupted computations
        with Counter(tiny_model, crash_after=1), pytest.raises(RuntimeError, match="simulated crash"):
            compute(tiny_model, store, hooks="resid_pre", positions=positions, batch_size=3)
    dead = resolve_request(tiny_model, PROMPTS, positions="last").key
    live = resolve_request(tiny_model, PROMPTS, positions="last_k(2)").key
    (e.path / ".manifest.json.999.tmp").write_text('{"half')
    (e.path / "hooks" / f"{H1}.safetensors").write_bytes(b"x" * 100)  # not named by the manifest
    (store.base / ("0" * 24)).mkdir()  # an entry directory without a manifest
    (store.base / ".trash" / "k-1").mkdir(parents=True)
    (store.base / ".trash" / "k-1" / "f").write_bytes(b"x")
    old_probe, new_probe = store.base / ".work" / ".probe-old", store.base / ".work" / ".probe-new"
    old_probe.write_bytes(b"")
    new_probe.write_bytes(b"")
    os.utime(old_probe, (time.time() - 3600,) * 2)
    assert sorted(store.ls()["status"]) == ["no manifest", "ok", "partial", "partial"]
    everything = snapshot(tmp_path), _files(store.base)
    with store.lock(live):  # another process computing: its work is never touched
        dry = store.gc(dry_run=True)
        assert (snapshot(tmp_path), _files(store.base)) == everything
        got = store.gc()
    assert dry["kind"].tolist() == got["kind"].tolist() and set(dry["action"]) >= {"would remove"}
    removed = got[got["action"] == "removed"]
    assert sorted(removed["kind"]) == ["no_manifest", "orphan", "probe", "tmp", "trash", "work"]
    assert got[got["action"].str.startswith("skipped")]["path"].tolist() == [str(store.work_path(live))]
    assert store.work_path(live).is_dir() and not store.work_path(dead).exists()
    assert new_probe.exists() and not old_probe.exists()
    assert sorted(store.ls()["status"]) == ["ok", "partial"]
    assert store.verify().empty and torch.equal(store.open(e.key).activations(H0), clean)
    # the interrupted work that was kept still resumes
    with Counter(tiny_model) as c:
        compute(tiny_model, store, hooks="resid_pre", positions="last_k(2)", batch_size=3)
    assert c.n == 2  # shard 0 was done before the crash
    assert main(["cache", "gc", "--root", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_removed"] == 0 and store.ls()["status"].tolist() == ["ok", "ok"]


def test_verify_and_gc_on_a_missing_store_are_errors(tmp_path, capsys):
    from workbench.cli import main

    missing = tmp_path / "nowhere"
    with pytest.raises(WorkbenchError, match=rf"there is no activation store at '{re.escape(str(missing))}' "
                                             r"\(no activations/ directory\): nothing to verify"):
        ActivationStore(missing).verify()
    assert main(["cache", "verify", "--root", str(missing), "--quiet"]) == 2
    assert "no activation store" in capsys.readouterr().err
    assert main(["cache", "gc", "--root", str(missing)]) == 2
    assert "nothing to clean" in capsys.readouterr().err
    assert not missing.exists()
    (missing / "activations").mkdir(parents=True)  # an empty store: nothing wrong with it
    assert main(["cache", "verify", "--root", str(missing), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries_checked"] == 0
