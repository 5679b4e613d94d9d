"""The ``hessjax`` command line: ``finetune``, ``measure``, ``select`` and ``demo``.

A thin shell over :mod:`hessjax.experiment`: argparse options are the fields of
:class:`hessjax.experiment.RunConfig` / :class:`~hessjax.experiment.DemoConfig` (with their
defaults), the commands call :func:`~hessjax.experiment.finetune`,
:func:`~hessjax.experiment.measure_run` and :func:`~hessjax.experiment.demo`, print, and set
the exit status (2 and one line on stderr for an error; ``--debug`` for the traceback).
``hessjax finetune`` run again resumes; every option is in ``hessjax <command> --help``.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hessjax.experiment import (
    NOISE_TYPES,
    DemoConfig,
    RunConfig,
    demo,
    finetune,
    measure_run,
    select_by_bound,
    write_json,
)
from hessjax.models.zoo import MODELS
from hessjax.train.methods import METHODS

__all__ = ["main"]


# ------------------------------------------------------------------------------ option types
def _devices_arg(text: str) -> int | str:
    """``--devices``: a positive int or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive int or 'all', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {value}")
    return value


def _int_at_least(lo: int, *, all_ok: bool = False):
    """An argparse type: an int >= ``lo`` (or ``all`` when ``all_ok``)."""

    def parse(text: str):
        if all_ok and text == "all":
            return None
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            extra = " or 'all'" if all_ok else ""
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}{extra}, got {text!r}")
        return value

    parse.__name__ = f"int >= {lo}"
    return parse


def _float_in(lo: float, hi: float | None = None, *, open_lo: bool = False):
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = np.isfinite(value) and (value > lo if open_lo else value >= lo)
        ok = ok and (hi is None or value <= hi)
        if not ok:
            where = f"{'(' if open_lo else '['}{lo}, {'inf)' if hi is None else f'{hi}]'}"
            raise argparse.ArgumentTypeError(f"expected a number in {where}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_POSITIVE = _int_at_least(1)
_NONNEG = _int_at_least(0)
_POSITIVE_FLOAT = _float_in(0.0, open_lo=True)


# ------------------------------------------------------------------------------ parser
# (flag, type, help) per option; the default is the config field of the same name. A type of
# None is a string, "flag" a store_true switch, a tuple the choices.
_DATA_OPTIONS = (
    ("--dataset", None, "fashion_mnist, digits (scikit-learn), tfds:<name>, or text: "
     "amazon_reviews, tweet_source (optionally :<tokens>, default 128; with --model minilm)"),
    ("--data-dir", None, "where the dataset files are"),
    ("--model", MODELS, "mobilenet_v2 (ImageNet weights, new zero head), tiny_cnn (tests), "
     "minilm (all-MiniLM-L6-v2, text) or minilm_random (the same, randomly initialised)"),
    ("--n-per-class", _POSITIVE, "training examples per class"),
    ("--val-size", _POSITIVE, "clean validation examples carved from the training split"),
    ("--test-size", _POSITIVE, "clean test examples kept"),
    ("--image-size", _POSITIVE, "resize images to this size"),
    ("--noise-rate", _float_in(0.0, 1.0), "label-noise rate rho of the training labels"),
    ("--epochs", _POSITIVE, "training epochs"),
    ("--lr", _POSITIVE_FLOAT, "learning rate"),
    ("--batch-size", _POSITIVE, "examples per step"),
    ("--seed", _NONNEG, "seeds data, noise, order, dropout"),
    ("--radius", _POSITIVE_FLOAT, "constraint radius D of the first stage"),
    ("--radius-scale", _POSITIVE_FLOAT, "radius growth s per stage: D * s^stage"),
    ("--head-radius", _POSITIVE_FLOAT, "radius of the new head around zero"),
)  # fmt: skip
_FINETUNE_OPTIONS = (
    ("--train-from", _NONNEG, "mobilenet_v2: fine-tune features.N-18 and the head only; blocks "
     "0..N-1 stay at their pretrained weights (eval mode) and their outputs are computed once "
     "per image (0: fine-tune everything)"),
    ("--noise-type", NOISE_TYPES, "symmetric: flip to another class; uniform: redraw over all "
     "classes; pair: flip class i to i+1"),
    ("--method", tuple(sorted(METHODS)), "the method"),
    ("--transition", ("true", "symmetric", "dual_t"), "T for forward/backward/robust: the true "
     "noise T, symmetric at --assumed-rate, or estimated by Dual-T from a plain fine-tuned model"),
    ("--assumed-rate", _float_in(0.0, 1.0), "rate of the symmetric T (default: --noise-rate)"),
    ("--optimizer", ("adam", "amsgrad", "adamw", "sgd"), "the optimizer"),
    ("--lr-decay-every", _POSITIVE, "multiply the learning rate by 0.1 every this many epochs"),
    ("--early-stopping", "flag", "stop after --patience epochs without better clean val "
     "accuracy (always on for plain_es) and keep the best parameters"),
    ("--patience", _POSITIVE, "early-stopping patience"),
    ("--penalty", _float_in(0.0), "L2-SP lambda"),
    ("--smoothing", _float_in(0.0, 1.0), "label smoothing"),
    ("--gce-q", _float_in(0.0, 1.0, open_lo=True), "GCE q"),
    ("--norm", ("frobenius", "inf_op"), "norm of the distance constraint"),
    ("--max-steps", _POSITIVE, "stop (after a checkpoint) at this many steps; rerun to continue"),
    ("--checkpoint-every", _POSITIVE, "also checkpoint every this many steps"),
    ("--output-dir", None, "where everything goes"),
)  # fmt: skip
_MEASURE_OPTIONS = (
    ("--examples", _int_at_least(1, all_ok=True),
     "training examples the max runs over (an int or 'all'; None = all, the theorem's)"),
    ("--num-iters", _POSITIVE, "Lanczos steps"),
    ("--chunk-size", _POSITIVE, "examples vmapped at once (1 is fastest on CPU for conv nets)"),
    ("--layers", None, "regex selecting measured kernels, or 'later' (MobileNetV2: "
     "features.14-18 and the head); default: every fine-tuned kernel"),
    ("--variant", ("canonical", "reference", "both"),
     "the paper's measure, the reference code's, or both"),
    ("--checkpoint", ("final", "best"), "which parameters of the run"),
    ("--seed", _NONNEG, "which training examples"),
    ("--output", None, "JSON file (default: RUN/measure.json)"),
)  # fmt: skip
_MEASURE_DEFAULTS = {"examples": None, "num_iters": 8, "chunk_size": 1, "variant": "canonical",
                     "checkpoint": "final", "seed": 0}  # fmt: skip
# (flag, type, RunConfig field, help): the grid of ``hessjax select``, one list per field
_GRID_OPTIONS = (
    ("--radii", _POSITIVE_FLOAT, "radius", "candidate radii D"),
    ("--head-radii", _float_in(0.0), "head_radius", "candidate head radii (0: the head stays 0)"),
    ("--methods", tuple(sorted(METHODS)), "method", "candidate methods"),
)  # fmt: skip
_SELECT_OPTIONS = (
    ("--loss-bound", _POSITIVE_FLOAT, "floor of the cross-entropy's clip level c0 in C "
     "(default: each candidate's largest training cross-entropy over all labels)"),
    ("--criterion", ("positive", "backward"), "the bound minimised: of the positive part of "
     "the backward-corrected loss (default), or of that loss itself (the paper's)"),
    ("--num-iters", _POSITIVE, "Lanczos steps"),
    ("--chunk-size", _POSITIVE, "examples vmapped at once"),
    ("--layers", None, "regex selecting measured kernels, or 'later'; default every kernel"),
)  # fmt: skip
_SELECT_DEFAULTS = {"num_iters": 8, "chunk_size": 1, "criterion": "positive"}
_DEMO_OPTIONS = (
    ("--train-from", _NONNEG, "mobilenet_v2: fine-tune features.N-18 and the head only "
     "(0: everything)"),
    ("--head-factor", _float_in(0.0), "the constraint candidates' head radius / body radius"),
    ("--num-iters", _POSITIVE, "Lanczos steps for the measure"),
    ("--chunk-size", _POSITIVE, "examples vmapped at once (1 is fastest on CPU for conv nets)"),
    ("--output-dir", None, "where everything goes"),
)  # fmt: skip
_COMMON_OPTIONS = (
    ("--devices", _devices_arg, "data-parallel over this many devices (an int or 'all'; on CPU "
     "simulate N with XLA_FLAGS=--xla_force_host_platform_device_count=N); default: one device"),
    ("--distributed", "flag", "multi-host: call jax.distributed.initialize first (coordinator, "
     "number of processes and process id from HESSJAX_COORDINATOR_ADDRESS, "
     "HESSJAX_NUM_PROCESSES, HESSJAX_PROCESS_ID, or auto-detected); --devices then counts all "
     "hosts' devices"),
)  # fmt: skip


def _add(p: argparse.ArgumentParser, options, defaults) -> None:
    """Adds ``options`` with defaults from ``defaults`` (a config object or a dict)."""
    for flag, kind, text in options:
        dest = flag[2:].replace("-", "_")
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=text)
            continue
        get = defaults.get if isinstance(defaults, dict) else lambda k: getattr(defaults, k, None)
        kw = {"choices": kind} if isinstance(kind, tuple) else {"type": kind} if kind else {}
        p.add_argument(flag, default=get(dest), help=text, **kw)


def _command(sub, name: str, text: str, func, *groups) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for options, defaults in groups:
        _add(p, options, defaults)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the traceback instead of one line")  # fmt: skip
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not keep compiled programs in $HESSJAX_COMPILATION_CACHE "
                        "(default ~/.cache/hessjax/jax)")  # fmt: skip
    p.set_defaults(func=func)
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessjax",
        description="Robust fine-tuning and Hessian-based generalization measures "
        "(Ju, Li & Zhang, ICML 2022).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run, demo_cfg = RunConfig(), DemoConfig()
    f = _command(sub, "finetune", "fine-tune a model with a method; resumable", _cmd_finetune,
                 (_DATA_OPTIONS, run), (_FINETUNE_OPTIONS, run), (_COMMON_OPTIONS, {}))  # fmt: skip
    f.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the output directory's last checkpoint")  # fmt: skip
    m = _command(sub, "measure", "Hessian distance report and bound of a finetune run",
                 _cmd_measure)  # fmt: skip
    m.add_argument("run", help="a `hessjax finetune` output directory")
    for options, defaults in ((_MEASURE_OPTIONS, _MEASURE_DEFAULTS), (_COMMON_OPTIONS, {})):
        _add(m, options, defaults)
    m.add_argument("--psd-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="exact fast path for networks piecewise linear in each layer "
                   "(default: the model's; MobileNetV2 and the tiny CNN yes)")  # fmt: skip
    s = _command(sub, "select", "fine-tune a grid of radii/methods; choose by the Theorem-2.1 "
                 "bound on the training data only (no validation data)", _cmd_select,
                 (_DATA_OPTIONS, run), (_FINETUNE_OPTIONS, run), (_SELECT_OPTIONS,
                 _SELECT_DEFAULTS), (_COMMON_OPTIONS, {}))  # fmt: skip
    for flag, kind, _, text in _GRID_OPTIONS:
        kw = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        s.add_argument(flag, nargs="+", help=text, **kw)
    d = _command(sub, "demo", "plain, the paper's algorithm and the constraint at radii chosen "
                 "by the bound, fine-tuning MobileNetV2 on noisy Fashion-MNIST; table, plot and "
                 "JSON", _cmd_demo, (_DATA_OPTIONS, demo_cfg),
                 (_DEMO_OPTIONS, demo_cfg))  # fmt: skip
    d.add_argument("--radii", nargs="+", type=_POSITIVE_FLOAT, default=list(demo_cfg.radii),
                   help="body radii D of the constraint candidates (--radius/--head-radius: "
                   "the paper's algorithm's)")  # fmt: skip
    return parser


def _cmd_finetune(args) -> int:
    cfg = vars(args).copy()
    cfg.pop("func")
    cfg.pop("command")
    progress = not cfg.pop("no_progress")
    cfg.pop("distributed", None)
    cfg.pop("debug", None)
    cfg.pop("no_compilation_cache", None)
    if cfg["method"] == "plain_es":
        cfg["early_stopping"] = True
    res = finetune(RunConfig.from_dict(cfg), progress=progress)
    if res.get("already_finished"):
        print(f"hessjax finetune: {cfg['output_dir']} already holds this run, finished; "
              "its results:", file=sys.stderr)  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
    return 0


def _output_file(path: Path) -> Path:
    """Check, before any computation, that ``path`` can be written (names ``--output``)."""
    import os

    parent = path.absolute().parent
    if path.is_dir():
        raise ValueError(f"--output: {path} is a directory; give a file name")
    if not parent.is_dir():
        raise ValueError(f"--output: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--output: {path} is not writable")
    return path


def _cmd_measure(args) -> int:
    path = _output_file(Path(args.output) if args.output else Path(args.run) / "measure.json")
    out = measure_run(args.run, num_examples=args.examples, num_iters=args.num_iters,
                      chunk_size=args.chunk_size, layers=args.layers, variant=args.variant,
                      checkpoint=args.checkpoint, seed=args.seed, devices=args.devices,
                      psd_blocks=args.psd_blocks)  # fmt: skip
    for v in ("canonical", "reference"):
        if v in out:
            psd = " (PSD blocks: v^T H v, checked)" if out["psd_blocks"] else ""
            print(f"[{v}] layers: {out['layers']}; max over {out['num_examples']} of "
                  f"{out['n']} training examples, {out['num_iters']} Lanczos steps"
                  f"{psd if v == 'canonical' else ''}")  # fmt: skip
            print(out[v]["table"])
            print(f"bound (Theorem 2.1, no xi): {out[v]['bound']:.6g}  "
                  f"train loss {out['train_loss']:.4g}, test loss {out['test_loss']:.4g}, "
                  f"gap {out['gap']:.4g}, C {out['loss_bound_C']:.4g}")  # fmt: skip
    write_json(path, out)
    return 0


def _cmd_select(args) -> int:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = {k: v for k, v in vars(args).items() if k in names}
    grid = {field: getattr(args, flag[2:].replace("-", "_")) for flag, _, field, _ in _GRID_OPTIONS
            if getattr(args, flag[2:].replace("-", "_"))}  # fmt: skip
    if not grid:
        raise ValueError("grid: give candidates with --radii, --head-radii and/or --methods")
    out = select_by_bound(RunConfig.from_dict(cfg), grid, loss_bound=args.loss_bound,
                          criterion=args.criterion, num_iters=args.num_iters,
                          chunk_size=args.chunk_size,
                          layers=args.layers, progress=not args.no_progress)  # fmt: skip
    column = out["criterion_column"]
    print(f"{'candidate':<36} {'train loss':>10} {'measure':>9} {'C':>8} {'bound':>9} "
          f"{'bound+':>9}   reported, not used: val acc  test acc")  # fmt: skip
    for row in out["table"]:
        rep = row["reported"]
        name = " ".join(f"{k}={v}" for k, v in row["candidate"].items())
        print(f"{name:<36} {row['train_loss']:>10.4f} {row['measure']:>9.4f} {row['C']:>8.3f} "
              f"{row['bound']:>9.4f} {row['bound_positive']:>9.4f}   "
              f"{rep['val_accuracy']:>25.3f} "
              f"{rep['test_accuracy']:>9.3f}")  # fmt: skip
    chosen = " ".join(f"{k}={v}" for k, v in out["chosen"].items())
    print(f"chosen by the bound ({column}): {chosen} ({out['chosen_run']}); "
          f"table in {Path(args.output_dir) / 'select.json'}")  # fmt: skip
    return 0


def _cmd_demo(args) -> int:
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    cfg = {k: v for k, v in vars(args).items() if k in names}
    cfg["radii"] = tuple(cfg["radii"])
    demo(DemoConfig(**cfg), progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessjax`` console script.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0, or 2 for an error (one line on stderr naming the option or file;
      with ``--debug`` the exception propagates with its traceback).

    Example:
      >>> main(["finetune", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "1",
      ...       "--output-dir", "/tmp/x"])  # doctest: +SKIP
    """
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if getattr(args, "distributed", False):
        from hessjax.sharding import initialize_distributed

        initialize_distributed()
    if not getattr(args, "no_compilation_cache", True):
        from hessjax.experiment.env import use_compilation_cache

        use_compilation_cache()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        print(f"hessjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """An exception as one line: the message, or for an OSError its file and reason."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
