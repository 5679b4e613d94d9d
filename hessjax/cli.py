"""The ``hessjax`` command line: ``finetune``, ``measure`` and ``demo``.

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
    write_json,
)
from hessjax.train.methods import METHODS
from hessjax.train.zoo import MODELS

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
def _add_data_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    c = DemoConfig() if demo else RunConfig()
    p.add_argument(
        "--dataset",
        default=c.dataset,
        help="fashion_mnist, digits (scikit-learn), tfds:<name>, or text: amazon_reviews, "
        "tweet_source (optionally :<tokens>, default 128; with --model minilm) "
        "(default %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument(
        "--model",
        default=c.model,
        choices=MODELS,
        help="mobilenet_v2 (ImageNet weights, new zero head), tiny_cnn (tests), minilm "
        "(all-MiniLM-L6-v2, text) or minilm_random (the same, randomly initialised)",
    )
    if not demo:
        p.add_argument(
            "--train-from",
            type=_NONNEG,
            default=RunConfig.train_from,
            help="mobilenet_v2: fine-tune features.N-18 and the head only; blocks 0..N-1 stay at "
            "their pretrained weights (eval mode) and their outputs are computed once per image "
            "(0: fine-tune everything)",
        )
    p.add_argument(
        "--n-per-class",
        type=_POSITIVE,
        default=c.n_per_class,
        help="training examples per class (default %(default)s)",
    )
    p.add_argument(
        "--val-size",
        type=_POSITIVE,
        default=c.val_size,
        help="clean validation examples carved from the training split",
    )
    p.add_argument(
        "--test-size", type=_POSITIVE, default=c.test_size, help="clean test examples kept"
    )
    p.add_argument(
        "--image-size",
        type=_POSITIVE,
        default=c.image_size,
        help="resize images to this size (default %(default)s)",
    )
    p.add_argument(
        "--noise-rate",
        type=_float_in(0.0, 1.0),
        default=c.noise_rate,
        help="label-noise rate rho of the training labels (default %(default)s)",
    )
    p.add_argument("--epochs", type=_POSITIVE, default=c.epochs, help="training epochs")
    p.add_argument(
        "--lr", type=_POSITIVE_FLOAT, default=c.lr, help="learning rate (default %(default)s)"
    )
    p.add_argument("--batch-size", type=_POSITIVE, default=c.batch_size, help="examples per step")
    p.add_argument("--seed", type=_NONNEG, default=c.seed, help="seeds data, noise, order, dropout")
    p.add_argument(
        "--radius",
        type=_POSITIVE_FLOAT,
        default=c.radius,
        help="constraint radius D of the first stage (default %(default)s)",
    )
    p.add_argument(
        "--radius-scale",
        type=_POSITIVE_FLOAT,
        default=c.radius_scale,
        help="radius growth s per stage: D * s^stage (default %(default)s)",
    )
    p.add_argument(
        "--head-radius",
        type=_POSITIVE_FLOAT,
        default=c.head_radius,
        help="radius of the new head around zero (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_mesh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices",
        type=_devices_arg,
        default=None,
        help="data-parallel over this many devices (an int or 'all'; on CPU simulate N with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N); default: one device",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize first (coordinator, number of "
        "processes and process id from HESSJAX_COORDINATOR_ADDRESS, HESSJAX_NUM_PROCESSES, "
        "HESSJAX_PROCESS_ID, or auto-detected); --devices then counts all hosts' devices",
    )


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the traceback instead of one line")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    R = RunConfig()

    parser = argparse.ArgumentParser(
        prog="hessjax",
        description="Robust fine-tuning and Hessian-based generalization measures "
        "(Ju, Li & Zhang, ICML 2022).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a model with a method; resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _add_data_options(f)
    f.add_argument(
        "--noise-type",
        default=R.noise_type,
        choices=NOISE_TYPES,
        help="symmetric: flip to another class; uniform: redraw over all classes; "
        "pair: flip class i to i+1",
    )
    f.add_argument("--method", default=R.method, choices=sorted(METHODS), help="the method")
    f.add_argument(
        "--transition",
        default=R.transition,
        choices=("true", "symmetric", "dual_t"),
        help="T for forward/backward/robust: the true noise T, symmetric at "
        "--assumed-rate, or estimated by Dual-T from a plain fine-tuned model",
    )
    f.add_argument(
        "--assumed-rate",
        type=_float_in(0.0, 1.0),
        default=R.assumed_rate,
        help="rate of the symmetric T (default: --noise-rate)",
    )
    f.add_argument("--optimizer", default=R.optimizer, choices=("adam", "amsgrad", "adamw", "sgd"))
    f.add_argument(
        "--lr-decay-every",
        type=_POSITIVE,
        default=R.lr_decay_every,
        help="multiply the learning rate by 0.1 every this many epochs",
    )
    f.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop after --patience epochs without better clean val accuracy "
        "(always on for plain_es) and keep the best parameters",
    )
    f.add_argument("--patience", type=_POSITIVE, default=R.patience, help="early-stopping patience")
    f.add_argument("--penalty", type=_float_in(0.0), default=R.penalty, help="L2-SP lambda")
    f.add_argument(
        "--smoothing", type=_float_in(0.0, 1.0), default=R.smoothing, help="label smoothing"
    )
    f.add_argument("--gce-q", type=_float_in(0.0, 1.0, open_lo=True), default=R.gce_q, help="GCE q")
    f.add_argument(
        "--norm",
        default=R.norm,
        choices=("frobenius", "inf_op"),
        help="norm of the distance constraint",
    )
    f.add_argument(
        "--max-steps",
        type=_POSITIVE,
        default=None,
        help="stop (after a checkpoint) at this many steps; rerun to continue",
    )
    f.add_argument(
        "--checkpoint-every",
        type=_POSITIVE,
        default=None,
        help="also checkpoint every this many steps",
    )
    f.add_argument("--output-dir", default=R.output_dir, help="where everything goes")
    f.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the output directory's last checkpoint",
    )
    _add_mesh_options(f)
    _add_debug(f)
    f.set_defaults(func=_cmd_finetune)

    m = sub.add_parser("measure", help="Hessian distance report and bound of a finetune run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    m.add_argument("run", help="a `hessjax finetune` output directory")
    m.add_argument(
        "--examples",
        type=_int_at_least(1, all_ok=True),
        default=16,
        help="training examples the max over examples runs over (an int or 'all')",
    )
    m.add_argument("--num-iters", type=_POSITIVE, default=8, help="Lanczos steps")
    m.add_argument("--chunk-size", type=_POSITIVE, default=1,
                   help="examples vmapped at once (1 is fastest on CPU for conv nets)")  # fmt: skip
    m.add_argument(
        "--layers",
        default=None,
        help="regex selecting measured kernels (default: all; MobileNetV2: "
        "features.14-18 and the head)",
    )
    m.add_argument(
        "--variant",
        default="canonical",
        choices=("canonical", "reference", "both"),
        help="the paper's measure, the reference code's, or both",
    )
    m.add_argument("--checkpoint", default="final", choices=("final", "best"))
    m.add_argument("--seed", type=_NONNEG, default=0, help="which training examples")
    m.add_argument("--output", default=None, help="JSON file (default: RUN/measure.json)")
    _add_mesh_options(m)
    _add_debug(m)
    m.set_defaults(func=_cmd_measure)

    d = sub.add_parser("demo", help="plain vs robust fine-tuning of MobileNetV2 on noisy "
                       "Fashion-MNIST; table, plot and JSON",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _add_data_options(d, demo=True)
    d.add_argument(
        "--examples", type=_POSITIVE, default=DemoConfig.examples, help="examples for the measure"
    )
    d.add_argument(
        "--num-iters",
        type=_POSITIVE,
        default=DemoConfig.num_iters,
        help="Lanczos steps for the measure",
    )
    d.add_argument("--chunk-size", type=_POSITIVE, default=DemoConfig.chunk_size,
                   help="examples vmapped at once (1 is fastest on CPU for conv nets)")  # fmt: skip
    d.add_argument("--output-dir", default=DemoConfig.output_dir, help="where everything goes")
    _add_debug(d)
    d.set_defaults(func=_cmd_demo)
    return parser


def _cmd_finetune(args) -> int:
    cfg = vars(args).copy()
    cfg.pop("func")
    cfg.pop("command")
    progress = not cfg.pop("no_progress")
    cfg.pop("distributed", None)
    cfg.pop("debug", None)
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
                      checkpoint=args.checkpoint, seed=args.seed,
                      devices=args.devices)  # fmt: skip
    for v in ("canonical", "reference"):
        if v in out:
            print(f"[{v}] layers: {out['layers']}; max over {out['num_examples']} examples")
            print(out[v]["table"])
            print(f"bound (Theorem 2.1, no xi): {out[v]['bound']:.6g}  "
                  f"train loss {out['train_loss']:.4g}, test loss {out['test_loss']:.4g}, "
                  f"gap {out['gap']:.4g}, C {out['loss_bound_C']:.4g}")  # fmt: skip
    write_json(path, out)
    return 0


def _cmd_demo(args) -> int:
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in names}),
         progress=not args.no_progress)  # fmt: skip
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
