"""Bad inputs, table-driven: every case raises the right exception with a message that names
the argument (or, for the command line, exits with status 2 and one line naming the option).

Each row is ``(id, call, exception type, regex the message must match)``; the regex names the
argument. The rows cover hvp, partition, estimators, measures, bounds, transforms, losses,
noise, models/weights, data, fit/evaluate and the CLI.
"""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hessjax
from hessjax import estimators as est
from hessjax.cli import main
from hessjax.models import TinyCNN
from hessjax.train import TrainConfig, evaluate, fit

PARAMS = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
X = jnp.ones((4, 3))
Y = jnp.array([0, 1, 2, 0])


def LOSS(p, ex):
    x, y = ex
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2) + 0.0 * jnp.sum(y)


def MV(v):
    return v


KEY = jax.random.key(0)
V3 = jnp.ones(3)
LOGITS = jnp.zeros((4, 3))


def _model():
    return TinyCNN(3, 1, width=4, rngs=nnx.Rngs(0))


IMG = np.zeros((8, 6, 6, 1), np.float32)
LAB = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)


def _fit(train=(IMG, LAB), val=None, **cfg):
    return fit(_model(), lambda lo, y: -jax.nn.log_softmax(lo)[jnp.arange(len(y)), y],
               optax.sgd(0.1), train, val, config=TrainConfig(batch_size=4, **cfg),
               progress=False)  # fmt: skip


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _zip_bomb(tmp_path):
    path = tmp_path / "bomb.pth"
    sd = tmp_path / "small.pth"
    hessjax.models.save_state_dict(sd, {"w": np.zeros(4, np.float32)})
    with zipfile.ZipFile(sd) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "/data/" in info.filename:
                data = b"\0" * (1000 * len(data))  # declared 16 bytes, inflates to 16 kB
            dst.writestr(info.filename, data)
    return path


CASES = [
    # hvp and partition
    ("hvp-mismatched-v", lambda t: hessjax.hvp(LOSS, PARAMS, {"w": V3}, (X, Y)), ValueError, r"\bv\b"),
    ("hvp-bad-shape", lambda t: hessjax.hvp(LOSS, PARAMS, {"w": jnp.ones((2, 2)), "b": V3}, (X, Y)), ValueError, r"\bv\b"),
    ("hvp-int-v", lambda t: hessjax.hvp(LOSS, PARAMS, {"w": jnp.ones((3, 3), int), "b": jnp.ones(3, int)}, (X, Y)), TypeError, r"\bv\b"),
    ("batched-hvp-chunk", lambda t: hessjax.batched_hvp(LOSS, PARAMS, jax.tree.map(lambda a: a[None], PARAMS), (X, Y), chunk_size=0), ValueError, "chunk_size"),
    ("partition-bad-group", lambda t: hessjax.layer_partition(PARAMS, group="nonsense"), TypeError, "group"),
    ("partition-select-none", lambda t: hessjax.layer_partition(PARAMS, select="nomatch"), ValueError, "select"),
    # estimators
    ("hutchinson-probes-0", lambda t: est.hutchinson_trace(MV, V3, KEY, num_probes=0), ValueError, "num_probes"),
    ("hutchinson-probes-float", lambda t: est.hutchinson_trace(MV, V3, KEY, num_probes=2.5), (TypeError, ValueError), "num_probes"),
    ("hutchinson-chunk", lambda t: est.hutchinson_trace(MV, V3, KEY, num_probes=2, chunk_size=-1), ValueError, "chunk_size"),
    ("hutchpp-probes", lambda t: est.hutchpp_trace(MV, V3, KEY, num_probes=1), ValueError, "num_probes"),
    ("lanczos-iters-0", lambda t: est.lanczos(MV, V3, num_iters=0), ValueError, "num_iters"),
    ("lanczos-nan-start", lambda t: est.lanczos(MV, jnp.full(3, jnp.nan), num_iters=2), ValueError, "v0"),
    ("lanczos-int-start", lambda t: est.lanczos(MV, jnp.ones(3, int), num_iters=2), TypeError, "v0"),
    ("eigenvalues-which", lambda t: est.eigenvalues(MV, V3, KEY, k=1, which="middle"), ValueError, "which"),
    ("eigenvalues-k-0", lambda t: est.eigenvalues(MV, V3, KEY, k=0), ValueError, r"\bk\b"),
    ("density-sigma-negative", lambda t: est.spectral_density(MV, V3, KEY, num_probes=1, num_iters=2, sigma=-1.0), ValueError, "sigma"),
    ("density-sigma-array", lambda t: est.spectral_density(MV, V3, KEY, num_probes=1, num_iters=2, sigma=jnp.array(-1.0)), ValueError, "sigma"),
    ("density-grid-2d", lambda t: est.spectral_density(MV, V3, KEY, num_probes=1, num_iters=2, grid=jnp.ones((2, 2))), ValueError, "grid"),
    ("density-num-grid", lambda t: est.spectral_density(MV, V3, KEY, num_probes=1, num_iters=2, num_grid=1), ValueError, "num_grid"),
    ("power-iters", lambda t: est.power_iteration(MV, V3, KEY, num_iters=0), ValueError, "num_iters"),
    ("quadform-iters", lambda t: est.positive_quadratic_form(MV, V3, num_iters=-2), ValueError, "num_iters"),
    # measures
    ("distance-nan-anchor", lambda t: hessjax.hessian_distance(LOSS, PARAMS, {"w": jnp.full((3, 3), jnp.nan), "b": jnp.zeros(3)}, (X, Y), n=4), ValueError, "anchor"),
    ("distance-inf-params", lambda t: hessjax.hessian_distance(LOSS, {"w": jnp.full((3, 3), jnp.inf), "b": jnp.zeros(3)}, PARAMS, (X, Y), n=4), ValueError, "params"),
    ("distance-anchor-shape", lambda t: hessjax.hessian_distance(LOSS, PARAMS, {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, (X, Y), n=4), ValueError, "anchor"),
    ("distance-n-0", lambda t: hessjax.hessian_distance(LOSS, PARAMS, PARAMS, (X, Y), n=0), ValueError, r"\bn\b"),
    ("distance-iters", lambda t: hessjax.hessian_distance(LOSS, PARAMS, PARAMS, (X, Y), n=4, num_iters=0), ValueError, "num_iters"),
    ("distance-variant", lambda t: hessjax.hessian_distance(LOSS, PARAMS, PARAMS, (X, Y), n=4, variant="paper"), ValueError, "variant"),
    ("distance-empty", lambda t: hessjax.hessian_distance(LOSS, PARAMS, PARAMS, (X[:0], Y[:0]), n=4), ValueError, "examples"),
    ("distance-nan-loss", lambda t: hessjax.hessian_distance(lambda p, ex: LOSS(p, ex) * jnp.nan, PARAMS, PARAMS, (X, Y), n=4), ValueError, "loss_fn"),
    ("distance-partition-type", lambda t: hessjax.hessian_distance(LOSS, PARAMS, PARAMS, (X, Y), n=4, partition="w"), TypeError, "partition"),
    ("layer-traces-probes", lambda t: hessjax.layer_traces(LOSS, PARAMS, (X, Y), KEY, num_probes=0), ValueError, "num_probes"),
    ("noise-stability-sigma", lambda t: hessjax.noise_stability(LOSS, PARAMS, (X, Y), KEY, sigma=-1.0), ValueError, "sigma"),
    ("distances-anchor", lambda t: hessjax.distances(PARAMS, {"w": jnp.ones(3)}), ValueError, "anchor"),
    # bounds
    ("bound-n", lambda t: hessjax.hessian_bound(0.1, 0.2, 0, loss_bound=1.0), ValueError, r"\bn\b"),
    ("bound-loss-bound", lambda t: hessjax.hessian_bound(0.1, 0.2, 10, loss_bound=-1.0), ValueError, "loss_bound"),
    ("bound-measure-negative", lambda t: hessjax.hessian_bound(0.1, -0.2, 10, loss_bound=1.0), ValueError, "measure"),
    ("bound-nan-train-loss", lambda t: hessjax.hessian_bound(float("nan"), 0.2, 10, loss_bound=1.0), ValueError, "train_loss"),
    ("corollary-shapes", lambda t: hessjax.corollary_bound(0.1, jnp.ones(2), jnp.ones(3), 10, loss_bound=1.0), ValueError, "radii|max_traces"),
    # transforms
    ("project-norm", lambda t: hessjax.project_to_anchor(1.0, norm="l7"), ValueError, "norm"),
    ("project-negative-radius", lambda t: hessjax.project_to_anchor(-1.0).init(PARAMS), ValueError, "radii"),
    ("project-vector-frobenius", lambda t: hessjax.project_to_anchor({"w": jnp.ones(3), "b": 1.0}).init(PARAMS), ValueError, "radii"),
    ("project-anchor-structure", lambda t: hessjax.project_to_anchor(1.0, anchor={"w": jnp.ones((3, 3))}).init(PARAMS), ValueError, "anchor"),
    ("project-no-params", lambda t: hessjax.project_to_anchor(1.0).update(PARAMS, hessjax.project_to_anchor(1.0).init(PARAMS)), ValueError, "params"),
    ("penalty-negative", lambda t: hessjax.anchor_penalty(-0.1).init(PARAMS), ValueError, "strength"),
    ("radii-negative-base", lambda t: hessjax.layerwise_radii(PARAMS, -1.0, scale_factor=1.0, depth_fn=hessjax.resnet_stage_depth), ValueError, "base"),
    # losses
    ("backward-transition-shape", lambda t: hessjax.backward_corrected_cross_entropy(LOGITS, Y, jnp.eye(2)), ValueError, "transition"),
    ("backward-singular", lambda t: hessjax.backward_corrected_cross_entropy(LOGITS, Y, jnp.ones((3, 3)) / 3), ValueError, "transition"),
    ("forward-rows", lambda t: hessjax.forward_corrected_cross_entropy(LOGITS, Y, jnp.eye(3) * 2), ValueError, "transition"),
    ("gce-q", lambda t: hessjax.generalized_cross_entropy(LOGITS, Y, q=0.0), ValueError, r"\bq\b"),
    ("smoothing-range", lambda t: hessjax.label_smoothing_cross_entropy(LOGITS, Y, smoothing=1.5), ValueError, "smoothing"),
    ("loss-label-range", lambda t: hessjax.generalized_cross_entropy(LOGITS, jnp.array([0, 1, 2, 3])), ValueError, "labels"),
    ("loss-label-shape", lambda t: hessjax.generalized_cross_entropy(LOGITS, jnp.zeros(3, int)), ValueError, "labels"),
    # noise
    ("symmetric-rate", lambda t: hessjax.symmetric_transition(1.5, num_classes=3), ValueError, "rate"),
    ("symmetric-classes", lambda t: hessjax.symmetric_transition(0.2, num_classes=1), ValueError, "num_classes"),
    ("pair-rate", lambda t: hessjax.pair_flip_transition(-0.1, num_classes=3), ValueError, "rate"),
    ("counts-negative", lambda t: hessjax.transition_from_counts(-jnp.ones((2, 2))), ValueError, "counts"),
    ("corrupt-transition-rows", lambda t: hessjax.corrupt_labels(KEY, Y, jnp.ones((3, 3))), ValueError, "transition"),
    ("corrupt-label-range", lambda t: hessjax.corrupt_labels(KEY, jnp.array([5]), jnp.eye(3)), ValueError, "labels"),
    ("dual-t-shapes", lambda t: hessjax.dual_t_transition(jnp.ones((4, 3)) / 3, jnp.zeros(5, int)), ValueError, "noisy_labels"),
    ("anchor-percentile", lambda t: hessjax.anchor_transition(jnp.ones((4, 3)) / 3, percentile=150.0), ValueError, "percentile"),
    # models and weights
    ("weights-missing", lambda t: hessjax.models.load_state_dict(t / "nope.pth"), FileNotFoundError, "nope.pth"),
    ("weights-empty", lambda t: hessjax.models.load_state_dict(_file(t, "empty.pth", b"")), ValueError, "empty.pth"),
    ("weights-random", lambda t: hessjax.models.load_state_dict(_file(t, "random.pth", np.random.default_rng(0).bytes(4096))), ValueError, "random.pth"),
    ("weights-truncated", lambda t: hessjax.models.load_state_dict(_file(t, "cut.pth", hessjax.models.weights.mobilenet_v2_weights_path().read_bytes()[:5000])), ValueError, "cut.pth"),
    ("weights-zip-bomb", lambda t: hessjax.models.load_state_dict(_zip_bomb(t)), ValueError, "bomb.pth"),
    ("mobilenet-first-block", lambda t: hessjax.pretrained_mobilenet_v2(10, first_block=40), ValueError, "first_block"),
    # data
    ("dataset-unknown", lambda t: hessjax.load_dataset("imagenet_21k"), ValueError, "imagenet_21k"),
    ("split-size", lambda t: hessjax.data.stratified_split(np.zeros(10, int), 20, seed=0), ValueError, "size"),
    ("subsample-n", lambda t: hessjax.data.subsample_per_class(np.zeros(10, int), 0, seed=0), ValueError, "n_per_class"),
    ("resize-size", lambda t: hessjax.data.resize_images(np.zeros((2, 4, 4, 1)), 0), ValueError, "size"),
    ("batches-size", lambda t: list(hessjax.data.iterate_batches(np.zeros(4), batch_size=0, seed=0)), ValueError, "batch_size"),
    ("splits-seed", lambda t: hessjax.load_splits("digits", seed=-1), ValueError, "seed"),
    # fit and evaluate
    ("fit-negative-label", lambda t: _fit(train=(IMG, LAB - 1)), ValueError, "train"),
    ("fit-float-labels", lambda t: _fit(train=(IMG, LAB.astype(np.float32) + 0.5)), TypeError, "train"),
    ("fit-val-label-range", lambda t: _fit(val=(IMG, LAB + 1)), ValueError, "val"),
    ("fit-shapes", lambda t: _fit(train=(IMG, LAB[:5])), ValueError, "train"),
    ("fit-batch", lambda t: _fit(train=(IMG[:2], LAB[:2])), ValueError, "batch_size"),
    ("fit-config-type", lambda t: fit(_model(), None, optax.sgd(0.1), (IMG, LAB), config={"epochs": 1}), ValueError, "config"),
    ("fit-fsdp-no-mesh", lambda t: fit(_model(), None, optax.sgd(0.1), (IMG, LAB), config=TrainConfig(batch_size=4), fsdp_min_size=4), ValueError, "fsdp_min_size"),
    ("evaluate-label-range", lambda t: evaluate(_model(), IMG, LAB + 5), ValueError, "labels"),
    ("evaluate-batch", lambda t: evaluate(_model(), IMG, LAB, batch_size=0), ValueError, "batch_size"),
    ("config-epochs", lambda t: TrainConfig(epochs=0), ValueError, "epochs"),
    ("config-method", lambda t: TrainConfig(method="magic"), ValueError, "method"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "exc", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(name, call, exc, pattern, tmp_path):
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


TINY = ["--dataset", "digits", "--model", "tiny_cnn", "--n-per-class", "4", "--val-size", "30",
        "--test-size", "30", "--image-size", "8", "--batch-size", "8", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["finetune", *TINY, "--epochs", "1", "--max-steps", "1",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    return out


def _foreign(tmp_path, text):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "config.json").write_text(text)
    return str(d)


CLI_CASES = [
    ("measure-examples-negative", lambda r, t: ["measure", str(r), "--examples", "-5"], "--examples"),
    ("measure-examples-word", lambda r, t: ["measure", str(r), "--examples", "many"], "--examples"),
    ("measure-layers-regex", lambda r, t: ["measure", str(r), "--layers", "["], "layers"),
    ("measure-layers-none", lambda r, t: ["measure", str(r), "--layers", "^nothing$"], "layers"),
    ("measure-output-missing-dir", lambda r, t: ["measure", str(r), "--output", str(t / "no" / "m.json")], "--output"),
    ("measure-output-is-dir", lambda r, t: ["measure", str(r), "--output", str(t)], "--output"),
    ("measure-truncated-config", lambda r, t: ["measure", _foreign(t, '{"dataset": "dig')], "config.json"),
    ("measure-foreign-config", lambda r, t: ["measure", _foreign(t, json.dumps({"a": 1}))], "config.json"),
    ("measure-list-config", lambda r, t: ["measure", _foreign(t, "[1, 2]")], "config.json"),
    ("measure-no-run", lambda r, t: ["measure", str(t)], "config.json"),
    ("measure-num-iters", lambda r, t: ["measure", str(r), "--num-iters", "0"], "--num-iters"),
    ("finetune-seed-negative", lambda r, t: ["finetune", *TINY, "--seed", "-1", "--output-dir", str(t / "x")], "--seed"),
    ("finetune-noise-rate", lambda r, t: ["finetune", *TINY, "--noise-rate", "1.5", "--output-dir", str(t / "x")], "--noise-rate"),
    ("finetune-lr-zero", lambda r, t: ["finetune", *TINY, "--lr", "0", "--output-dir", str(t / "x")], "--lr"),
    ("finetune-lr-nan", lambda r, t: ["finetune", *TINY, "--lr", "nan", "--output-dir", str(t / "x")], "--lr"),
    ("finetune-batch", lambda r, t: ["finetune", *TINY, "--batch-size", "0", "--output-dir", str(t / "x")], "--batch-size"),
    ("finetune-epochs", lambda r, t: ["finetune", *TINY, "--epochs", "-1", "--output-dir", str(t / "x")], "--epochs"),
    ("finetune-other-seed", lambda r, t: ["finetune", *TINY, "--epochs", "1", "--max-steps", "1", "--seed", "5", "--output-dir", str(r)], "config.seed"),
    ("finetune-other-val-size", lambda r, t: ["finetune", *TINY, "--epochs", "1", "--max-steps", "1", "--val-size", "31", "--output-dir", str(r)], "config.val_size"),
    ("finetune-output-is-file", lambda r, t: ["finetune", *TINY, "--output-dir", str(r / "config.json")], "output_dir"),
    ("finetune-unknown-dataset", lambda r, t: ["finetune", *TINY[2:], "--dataset", "nope", "--output-dir", str(t / "x")], "nope"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "needle"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_error_is_one_line_naming_the_option(name, argv, needle, run_dir, tmp_path, capsys):
    before = (run_dir / "config.json").read_bytes()
    capsys.readouterr()
    try:
        code = main(argv(run_dir, tmp_path))
    except SystemExit as e:  # argparse: usage line, then the error line
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert needle in err[-1] and "error" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert (run_dir / "config.json").read_bytes() == before  # a rejected run writes nothing
