"""CLI: ``workbench controller train|eval`` and ``workbench bench steer``."""

from __future__ import annotations

import argparse


def _train(a: argparse.Namespace) -> dict:
    from .data import CATEGORIES, organism_splits
    from .models import load_model
    from .steering.compare import training_prompts
    from .steering.controller import ControllerConfig, save_controller
    from .steering.pipeline import resolve_direction
    from .steering.train import E2EWeights, build_training_set, train_bce, train_e2e, typical_refusal

    model = load_model(a.model, device=a.device, dtype=a.dtype)
    direction = resolve_direction(model, a.direction, show_progress=not a.quiet)
    vec = direction.vector.float()
    unit = vec / vec.norm()
    n = int(model.cfg.n_layers)
    train = organism_splits("train", CATEGORIES)
    harmful, benign, _ = training_prompts(train, a.wrapped_negatives)
    cfg = ControllerConfig(d_model=int(model.cfg.d_model), n_layers=n, input_layers=list(range(max(0, n - 4), n)),
                           hidden=a.hidden, pooling=a.pooling, scale_head=a.scale_head,
                           scale_activation="softplus" if a.objective == "e2e" else "sigmoid",
                           alpha=float(vec.norm()) / n, objective=a.objective)
    data = build_training_set(model, harmful, benign, cfg, show_progress=not a.quiet)
    if a.objective == "e2e":
        reply = typical_refusal(model, train["harmful"][:64])
        ctrl, hist = train_e2e(model, unit, data, cfg, steps=a.steps,
                               weights=E2EWeights(l1=a.l1, detect=a.detect), refusal_reply=reply, show_progress=not a.quiet)
        final = {**hist[-1], "refusal_reply": reply}
    else:
        ctrl, losses = train_bce(model, unit, data, cfg, epochs=a.steps, show_progress=not a.quiet)
        final = {"loss": losses[-1]}
    path = save_controller(ctrl, unit, a.out)
    return {"controller": str(path), "objective": a.objective, "final_loss": final,
            "n_train": {"harmful": len(harmful), "benign": len(benign)}}


def _eval(a: argparse.Namespace) -> dict:
    from .models import load_model
    from .steering.compare import CompareConfig
    from .steering.pipeline import resolve_direction, run_comparison

    model = load_model(a.model, device=a.device, dtype=a.dtype)
    direction = resolve_direction(model, a.direction, show_progress=not a.quiet)
    cc = CompareConfig(e2e_steps=a.steps, pooling=a.pooling, seed=a.seed, e2e_detect=a.detect,
                       e2e_scale_head=a.scale_head, wrapped_negatives=a.wrapped_negatives)
    if a.methods:
        cc.methods = tuple(a.methods.split(","))
    out = run_comparison(model, direction, cc, out_dir=a.out, limit=a.limit, show_progress=not a.quiet)
    out.pop("_result")
    return out


def _bench(a: argparse.Namespace) -> dict:
    from .bench.steer import bench_steer

    return bench_steer(batch=a.batch, max_new_tokens=a.max_new_tokens, repeats=a.repeats,
                       random_model=not a.organism_only)


def _add_controller_args(p) -> None:
    """Options shared by ``controller train`` and ``controller eval`` (defaults: :class:`CompareConfig`)."""
    from .steering.compare import CompareConfig

    cc = CompareConfig()
    p.add_argument("--direction", default=None, help="a saved Direction (default: find + select one)")
    p.add_argument("--steps", type=int, default=cc.e2e_steps, help="end-to-end training steps (BCE: epochs)")
    p.add_argument("--pooling", choices=["last", "post_instruction_mean"], default=cc.pooling,
                   help="controller input position(s): the last prompt token (the paper) or the post-instruction mean")
    p.add_argument("--detect", type=float, default=cc.e2e_detect,
                   help="weight of the auxiliary detection (BCE) term in end-to-end training")
    p.add_argument("--scale-head", choices=["mlp", "linear"], default=cc.e2e_scale_head,
                   help="the scale s from the MLP (the paper) or a linear probe of the inputs")
    p.add_argument("--wrapped-negatives", action=argparse.BooleanOptionalAction, default=cc.wrapped_negatives,
                   help="add the train jailbreaks' wrappers around benign prompts as benign examples")


def register(sub, bench_sub) -> None:
    from .cli import add_common_args

    p = sub.add_parser("controller", help="Weighted Activation Steering controllers (train, evaluate vs baselines)")
    csub = p.add_subparsers(dest="controller_command", required=True)
    t = csub.add_parser("train", help="train a WAS controller on the organism's train split")
    add_common_args(t)
    _add_controller_args(t)
    t.add_argument("--objective", choices=["e2e", "bce"], default="e2e")
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--l1", type=float, default=0.001)
    t.add_argument("--out", default="runs/latest/controllers/was_e2e")
    t.set_defaults(func=_train)
    e = csub.add_parser("eval", help="every method (none, actadd, cast, official_equivalent, was_bce, was_e2e) on test")
    add_common_args(e)
    _add_controller_args(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--methods", default=None, help="comma-separated subset of methods")
    e.add_argument("--limit", type=int, default=None, help="at most this many prompts per category and split")
    e.add_argument("--out", default="runs/latest/steering")
    e.set_defaults(func=_eval)

    b = bench_sub.add_parser("steer", help="steered vs unsteered generation; batched vs per-prompt")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--max-new-tokens", type=int, default=24)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--organism-only", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bench)
