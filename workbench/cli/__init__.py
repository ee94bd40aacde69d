"""The ``workbench`` command line: thin commands over the public API, one module per command.

Every command has ``--help``; long work shows progress bars unless ``--quiet``; ``--json`` prints the result as
JSON on stdout (logs and bars go to stderr). The options of the analysis commands are generated from the stages'
config dataclasses (:mod:`.options`), so the command line, ``workbench run`` and the Python API share one set of
defaults. Modules: :mod:`.run` (``run``), :mod:`.evaluate`, :mod:`.directions`, :mod:`.patch`, :mod:`.sparsity`,
:mod:`.controller` (``controller train|eval``, ``bench steer``), :mod:`.cache` (``cache ...``, ``bench cache``),
:mod:`.organism`, :mod:`.doctor`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import WorkbenchError
from ..models import DEFAULT_MODEL


def add_common_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    """--model/--device/--dtype (when ``model``), --quiet and --json."""
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL, help="'organism' (default), a registered real model (workbench models ls), a .gguf file, a local HF directory or a hub name")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_data_args(p: argparse.ArgumentParser, limit: bool = True) -> None:
    """--data (a :class:`workbench.promptsets.PromptSets` source), --limit and --store of an analysis command."""
    from .options import parse_positive_int

    p.add_argument("--data", default="organism", help="prompt data: 'organism' (default), 'real' (HarmBench, "
                   "StrongREJECT, GPTFuzzer, MT-Bench and shipped harmless/borderline prompts with fixed splits; run "
                   "`workbench data fetch` once) or a prompt file (JSONL, CSV, TSV, JSON, Parquet with prompt and "
                   "category columns, optionally split and reply)")
    if limit:
        p.add_argument("--limit", type=parse_positive_int, default=None, help="at most this many prompts per category and split")
    p.add_argument("--store", default=None, help="activation store root (default $WORKBENCH_CACHE or ~/.cache/workbench)")


def add_ls_fetch(sub, command: str, help: str, ls: tuple, fetch: tuple) -> None:
    """``workbench <command> ls|fetch``: ``ls = (handler, help)``, ``fetch = (handler, help, names_nargs,
    names_help, wheel_help)`` (``fetch`` takes names and ``--wheel``, an already downloaded wheel)."""
    p = sub.add_parser(command, help=help)
    csub = p.add_subparsers(dest=f"{command}_command", required=True)
    ls_p = csub.add_parser("ls", help=ls[1])
    add_common_args(ls_p, model=False)
    ls_p.set_defaults(func=ls[0])
    handler, fetch_help, nargs, names_help, wheel_help = fetch
    fetch_p = csub.add_parser("fetch", help=fetch_help)
    fetch_p.add_argument("names", nargs=nargs, help=names_help)
    fetch_p.add_argument("--wheel", default=None, help=wheel_help)
    add_common_args(fetch_p, model=False)
    fetch_p.set_defaults(func=handler)


def load_inputs(a: argparse.Namespace):
    """``(model, data, store)`` of an analysis command's common options."""
    from ..models import load_model
    from ..promptsets import load_data
    from ..store import ActivationStore

    data = load_data(a.data).limited(getattr(a, "limit", None))
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    return model, data, ActivationStore(getattr(a, "store", None))


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for k, v in result.items():
            print(f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")


#: Modules that add their own commands: each defines ``register(sub, bench_sub)`` which adds parsers to the
#: top-level subparsers ``sub`` and to the ``workbench bench ...`` subparsers ``bench_sub``.
COMMAND_MODULES: list[str] = [
    "workbench.cli.evaluate",
    "workbench.cli.organism",
    "workbench.cli.run",
    "workbench.cli.cache",
    "workbench.cli.directions",
    "workbench.cli.patch",
    "workbench.cli.controller",
    "workbench.cli.sparsity",
    "workbench.cli.doctor",
    "workbench.cli.models",
    "workbench.cli.data",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="ratio benchmarks against peers, measured in one process")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, bench_sub)
    return parser


def _warnings_to_stderr() -> None:
    """The CLI prints the workbench's warnings (fallbacks, dropped rows, unchecked files) as ``workbench: warning: ...``
    on stderr: without a handler of its own, a warning logged while the fallback recorder listens would be lost."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a redirected stream)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value):
            pass

    logger = logging.getLogger("workbench")
    if not any(getattr(h, "_wb_stderr", False) for h in logger.handlers):
        handler = CurrentStderr()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("workbench: warning: %(message)s"))
        handler._wb_stderr = True
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..fallbacks import recording_fallbacks

    _warnings_to_stderr()
    try:
        with recording_fallbacks() as fallbacks:
            result = args.func(args)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return 2
    if fallbacks and isinstance(result, dict):  # every fallback also reaches the JSON, not only the log
        result.setdefault("fallbacks", fallbacks)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        emit(result, args.json)
    # a command reporting checks (``workbench doctor``) says ``"ok": false`` when one failed: exit status 1
    return 1 if isinstance(result, dict) and result.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
