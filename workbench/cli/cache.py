"""``workbench cache ls|rm|verify|gc|compute`` and ``workbench bench cache``: thin commands over workbench.store."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import WorkbenchError


def _root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="store directory (default: $WORKBENCH_CACHE or ~/.cache/workbench)")


def _store(a):
    from ..store import ActivationStore

    return ActivationStore(a.root)


def _records(df) -> list[dict]:
    return json.loads(df.to_json(orient="records"))


def cmd_ls(a: argparse.Namespace) -> dict:
    store = _store(a)
    df = store.ls()
    if not a.json:
        with __import__("pandas").option_context("display.max_colwidth", 40, "display.width", 200):
            print(df.drop(columns=["path", "fingerprint"]).to_string(index=False) if len(df) else "(no entries)")
        return {"root": str(store.root), "n_entries": len(df)}
    return {"root": str(store.root), "n_entries": len(df), "entries": _records(df)}


def cmd_rm(a: argparse.Namespace) -> dict:
    store = _store(a)
    keys = [store.resolve_key(k) for k in a.keys]  # all resolved before anything is removed
    for k in keys:
        store.rm(k)
    return {"root": str(store.root), "removed": keys}


def cmd_verify(a: argparse.Namespace) -> dict:
    store = _store(a)
    bad = store.verify(a.key, show_progress=not a.quiet)  # raises on a missing store: nothing checked is no success
    n = len(store.entry_dirs()) if a.key is None else 1
    keys = None if a.key is None else {store.resolve_key(a.key)}
    unsealed = [k for k in store.unsealed() if keys is None or k in keys]
    result = {"root": str(store.root), "entries_checked": n, "n_problems": len(bad), "problems": _records(bad),
              "no_manifest_checksum": unsealed}
    if len(bad):
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            print(bad.to_string(index=False))
        raise WorkbenchError(
            f"{len(bad)} corrupted file(s) or shard(s) in {bad['key'].nunique()} entr(y/ies); remove them with "
            f"`workbench cache rm KEY` and recompute"
        )
    return result


def cmd_gc(a: argparse.Namespace) -> dict:
    store = _store(a)
    df = store.gc(dry_run=a.dry_run)
    done = df[df["action"] != "skipped: another process holds its writer lock"]
    if not a.json:
        print(df.to_string(index=False) if len(df) else "(no debris)")
    return {"root": str(store.root), "dry_run": a.dry_run, "n_removed": len(done),
            "freed_mb": round(float(done["size_mb"].sum()), 3) if len(done) else 0.0, "items": _records(df)}


def _parse_positions(s: str):
    if re.fullmatch(r"\s*-\d+(\s*,\s*-\d+)*\s*", s):
        return [int(x) for x in s.split(",")]
    return s


def _read_prompts(path: str) -> list:
    from ..data import read_jsonl

    if path.endswith(".jsonl"):
        rows = read_jsonl(path)
        for i, r in enumerate(rows, 1):       # the checks of PromptSets.from_rows, whose rows need no category here
            if not isinstance(r, dict):
                raise WorkbenchError(f"{path}: row {i} is {type(r).__name__}, expected an object with a 'prompt' field")
            if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
                raise WorkbenchError(f"{path}: row {i} has no 'prompt' text (fields: {sorted(r)})")
        return rows
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.rstrip("\n") for line in fh if line.strip()]
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"prompt file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise WorkbenchError(f"cannot read prompt file {path!r}: {exc.strerror}") from None


def _fitted(model, prompts: list, truncate: str, system: str | None) -> list:
    """``prompts`` (texts or rows with a 'prompt') cut to the model's context at the ``truncate`` end
    (:func:`workbench.chat.fit_prompts`; without ``--truncate`` an over-long prompt is an error)."""
    from ..chat import fit_prompts

    texts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    fitted = fit_prompts(model.tokenizer, texts, truncate, system)
    return [{**p, "prompt": t} if isinstance(p, dict) else t for p, t in zip(prompts, fitted)]


def cmd_compute(a: argparse.Namespace) -> dict:
    from ..models import load_model
    from ..store import get_or_compute

    if a.prompts:
        prompts = _read_prompts(a.prompts)
    else:
        from ..promptsets import load_data

        data = load_data(a.data)
        rows = data.rows_of(a.split)
        if a.category:
            rows = [r for r in rows if r.get("category") == a.category]
            if not rows:
                raise WorkbenchError(f"no prompts of category {a.category!r} in split {a.split!r} of {data.source}")
        prompts = rows
    if a.limit is not None:
        prompts = prompts[:a.limit]
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    if a.truncate:
        prompts = _fitted(model, prompts, a.truncate, a.system)
    hooks = [h.strip() for h in a.hooks.split(",") if h.strip()]
    entry = get_or_compute(model, prompts, hooks=hooks, positions=_parse_positions(a.positions), dtype=a.cache_dtype,
                           store=_store(a), batch_size=a.batch_size, system=a.system, show_progress=not a.quiet)
    from ..store.core import summarise_hooks

    return {"key": entry.key, "path": str(entry.path), "n_prompts": entry.n_prompts, "positions": entry.positions,
            "dtype": entry.dtype, "hooks": summarise_hooks(entry.hook_names), "n_hooks": len(entry.hook_names)}


def cmd_bench(a: argparse.Namespace) -> dict:
    from ..bench.cache import run_benchmark

    return run_benchmark(n_prompts=a.n_prompts, batch_size=a.batch_size, repeats=a.repeats, rss_prompts=a.rss_prompts,
                         organism=not a.no_organism, threads=a.threads, model=a.model)


def register(sub, bench_sub) -> None:
    """Add ``workbench cache ...`` to ``sub`` and ``workbench bench cache`` to ``bench_sub``."""
    from ..batching import parse_batch_size
    from . import add_common_args
    from .options import parse_positive_int

    p = sub.add_parser("cache", help="the shared activation cache store (ls, rm, verify, gc, compute)")
    csub = p.add_subparsers(dest="cache_command", required=True)

    c = csub.add_parser("ls", help="list the entries of the store")
    add_common_args(c, model=False)
    _root(c)
    c.set_defaults(func=cmd_ls)

    c = csub.add_parser("rm", help="remove entries (by key or unique key prefix)")
    c.add_argument("keys", nargs="+")
    add_common_args(c, model=False)
    _root(c)
    c.set_defaults(func=cmd_rm)

    c = csub.add_parser("verify", help="check manifests, headers and every checksum (one entry or all); exit status "
                        "2 on corruption or when there is no store")
    c.add_argument("key", nargs="?", default=None)
    add_common_args(c, model=False)
    _root(c)
    c.set_defaults(func=cmd_verify)

    c = csub.add_parser("gc", help="remove the debris of interrupted work (unfinished .work directories, "
                        "half-written temporaries, leftovers of removals); skips keys another process is writing")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    add_common_args(c, model=False)
    _root(c)
    c.set_defaults(func=cmd_gc)

    c = csub.add_parser("compute", help="compute (or find) the activations of a prompt split")
    add_common_args(c)
    _root(c)
    c.add_argument("--data", default="organism", help="prompt data: 'organism' (default) or a prompt file with "
                   "prompt and category columns (see workbench.promptsets)")
    c.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of --data (default test)")
    c.add_argument("--category", default=None, help="only this category of the split (harmful, benign...)")
    c.add_argument("--prompts", default=None, help="a .jsonl file with a 'prompt' field (other fields kept as "
                   "metadata) or a text file with one prompt per line, instead of a split of --data")
    c.add_argument("--limit", type=parse_positive_int, default=None, help="at most this many prompts")
    c.add_argument("--hooks", default="resid_pre", help="comma-separated hook names or aliases, e.g. "
                   "'resid_pre,mlp_out.3,blocks.2.hook_attn_out' (default resid_pre: every layer)")
    c.add_argument("--positions", default="post_instruction",
                   help="last, post_instruction (default), last_k(K), all, or offsets like -3,-1")
    c.add_argument("--cache-dtype", default="float32", help="storage dtype: float32 (default), bfloat16, float16")
    c.add_argument("--batch-size", type=parse_batch_size, default=32,
                   help="prompts per forward pass and shard, or 'auto' (from free memory, halved on out-of-memory)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--truncate", default=None, choices=["left", "right"],
                   help="cut prompts longer than the model's context at this end (default: an over-long prompt is "
                        "an error naming the count and the limit)")
    c.set_defaults(func=cmd_compute)

    b = bench_sub.add_parser("cache", help="store vs bare forward vs run_with_cache; peak RSS at 1x and 4x prompts")
    add_common_args(b, model=False)
    b.add_argument("--n-prompts", type=parse_positive_int, default=32)
    b.add_argument("--batch-size", type=parse_positive_int, default=16)
    b.add_argument("--repeats", type=parse_positive_int, default=5)
    b.add_argument("--rss-prompts", type=parse_positive_int, default=64, help="prompts of the 1x RSS run (4x runs 4 times as many)")
    b.add_argument("--no-organism", action="store_true", help="only the random-weight Llama")
    b.add_argument("--threads", type=parse_positive_int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--model", default=None, help="only this model (any name load_model accepts, e.g. "
                   "smollm2-135m-instruct) on short real prompts, instead of the random Llama and the organism")
    b.set_defaults(func=cmd_bench)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["cache", *sys.argv[1:]]))
