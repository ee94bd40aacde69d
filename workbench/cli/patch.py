"""``workbench patch`` and ``workbench bench patch``: thin commands over :mod:`workbench.patching`."""

from __future__ import annotations

import argparse


def _positions(text: str):
    if text in ("all", "post", "last"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from ..errors import WorkbenchError

        raise WorkbenchError(f"--positions must be all, post, last or comma-separated ints, got {text!r}") from None


def cmd_patch(a: argparse.Namespace) -> dict:
    import dataclasses

    from ..models import load_model
    from ..patching import make_pairs, prepare, read_pairs, run_patching
    from ..promptsets import load_data
    from ..stages import PatchingConfig
    from ..stages.patching import prompt_pairs
    from .options import config_from_args

    cfg = config_from_args(PatchingConfig, a)
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    limit = cfg.n_pairs or None
    if a.pairs:
        clean, corrupted = read_pairs(a.pairs)
        pairs = make_pairs(model.tokenizer, clean, corrupted, drop_unequal=True, limit=limit)
    else:   # the data's minimal pairs, else its harmful and benign prompts matched by token length
        pairs = prompt_pairs(model, load_data(a.data), dataclasses.replace(cfg, n_pairs=limit))
    from ..patching.run import organism_ground_truth

    direction, source, planted = None, None, None
    truth = organism_ground_truth(model)
    if truth is not None:
        planted, direction = truth
        source = "the organism's planted direction u (ground_truth.safetensors)"
    if a.direction:
        from ..directions import Direction

        direction = Direction.load(a.direction, model=model)
        source = f"Direction {a.direction}"
    components = list(cfg.components)
    store = None if a.no_store else (a.store or True)
    runs = prepare(model, pairs, cfg.metric, components, store=store, show_progress=not a.quiet)
    report = run_patching(
        model, runs, components=components, mode=a.mode, attribution=not a.no_attribution,
        direction=direction, direction_layer=a.layer, positions=_positions(a.positions), readers=a.readers,
        planted_layer=planted, engine=a.engine, show_progress=not a.quiet,
    )
    summary = dict(report.summary)
    if source and "subspace" in summary:
        summary["subspace"]["direction"] = source
    summary["model"] = a.model
    if a.out:
        summary["saved_to"] = str(report.save(a.out))
    return summary


def cmd_bench_patch(a: argparse.Namespace) -> dict:
    import torch

    from ..bench.patch import bench_patch

    if a.threads:
        torch.set_num_threads(a.threads)
    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    out = bench_patch(models, n_pairs=a.n_pairs, repeats=a.repeats, device=a.device, show_progress=not a.quiet)
    out["torch_threads"] = torch.get_num_threads()
    return out


def register(sub, bench_sub) -> None:
    from ..patching import ENGINES, MODES, READERS
    from ..stages import PatchingConfig
    from . import add_common_args
    from .options import add_config_options, parse_positive_int

    p = sub.add_parser("patch", help="activation patching of refusal: exact sweeps, attribution, subspace + illusion check")
    add_common_args(p)
    p.add_argument("--pairs", default=None, help="JSONL of {\"clean\": harmful, \"corrupted\": benign} (default: the "
                   "minimal pairs of --data); pairs of unequal token length are dropped")
    p.add_argument("--data", default="organism", help="prompt data whose pairs are patched (default: the organism); "
                   "without minimal pairs its harmful and benign prompts are matched by token length")
    add_config_options(p, PatchingConfig)   # --n-pairs (0: all), --components, --metric, --pair-split
    p.add_argument("--mode", choices=MODES, default="denoise", help="denoise: clean into corrupted; noise: the reverse")
    p.add_argument("--engine", choices=ENGINES, default="auto")
    p.add_argument("--no-attribution", action="store_true", help="skip attribution patching")
    p.add_argument("--direction", default=None, help="a saved Direction (workbench.directions) for subspace patching; "
                   "default: diff-in-means of the pairs at --layer")
    p.add_argument("--layer", type=int, default=None, help="layer of the subspace analyses (default: the direction's, "
                   "else the organism's planted layer, else the first layer whose last-position effect exceeds 0.5)")
    p.add_argument("--positions", default="post", help="positions of the subspace patches: all, post, last or ints")
    p.add_argument("--readers", choices=READERS, default="downstream", help="weights defining the row space of the "
                   "illusion check")
    p.add_argument("--store", default=None, help="cache store root for the clean activations (default: the default store)")
    p.add_argument("--no-store", action="store_true", help="compute clean activations here instead of using the store")
    p.add_argument("--out", default=None, help="write patching.json and the sweeps as CSV under this directory")
    p.set_defaults(func=cmd_patch)

    b = bench_sub.add_parser("patch", help="batched resid_pre sweep vs transformer_lens get_act_patch_resid_pre")
    add_common_args(b, model=False)
    b.add_argument("--models", default="organism,random512",
                   help="comma-separated: organism, random512 (random d_model 512 / 8-layer Llama) or any name "
                   "load_model accepts (e.g. smollm2-135m-instruct, a path), patched on short real prompt pairs")
    b.add_argument("--n-pairs", type=parse_positive_int, default=4)
    b.add_argument("--repeats", type=parse_positive_int, default=3, help="timing repeats; the median is reported")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=parse_positive_int, default=None, help="torch CPU threads (default: torch's)")
    b.set_defaults(func=cmd_bench_patch)
