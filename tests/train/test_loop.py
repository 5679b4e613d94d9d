"""Tests of hessjax.train: every method builds and steps, exact resume, checkpoint errors,
early stopping, evaluation."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from hessjax.models import TinyCNN, mobilenet_v2_stage_depth
from hessjax.noise import symmetric_transition
from hessjax.train import (
    METHODS,
    TrainConfig,
    build_method,
    evaluate,
    fit,
    split_model,
)

K = 3


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % K).astype(np.int32)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32) + y[:, None, None, None]
    return x, y


def _model(seed=0):
    return TinyCNN(K, 1, width=4, rngs=nnx.Rngs(seed))


def _params(model):
    return nnx.to_pure_dict(split_model(model)[2])


def _run(method, workdir=None, val=True, **kw):
    model = _model()
    cfg = TrainConfig(method=method, noise_rate=0.2, lr=1e-2, batch_size=8, **kw)
    x, y = _data()
    m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=len(y) // 8)
    v = _data(12, 1) if val else None
    return fit(model, m.loss, m.tx, (x, y), v, config=cfg, workdir=workdir, progress=False)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "my_plain"))
def test_every_method_builds_and_steps(method):
    model = _model()
    before = jax.tree.map(np.asarray, _params(model))
    r = _run(method, epochs=1, val=False)
    assert r.step == 3
    after = _params(r.model)
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    assert any(changed)
    assert np.isfinite(r.history[0]["train_loss"])


def test_constraint_keeps_params_in_the_balls():
    cfg = TrainConfig(
        method="constraint",
        radius=0.05,
        radius_scale=1.0,
        head_radius=0.05,
        lr=0.1,
        batch_size=8,
        epochs=2,
    )
    model = _model()
    anchor = jax.tree.map(np.asarray, _params(model))
    m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
    r = fit(model, m.loss, m.tx, _data(), None, config=cfg, progress=False)
    p = _params(r.model)
    for name in ("conv1", "conv2", "head"):
        d = np.linalg.norm(np.asarray(p[name]["kernel"]) - anchor[name]["kernel"])
        assert d <= 0.05 + 1e-5


def test_methods_needing_t_without_it_raise():
    with pytest.raises(ValueError, match="transition"):
        build_method(
            TrainConfig(method="robust"), {"w": np.ones((2, 2))}, num_classes=2, steps_per_epoch=1
        )


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="nope")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)


ROBUST_VARIANTS = ("robust_clipped", "robust_forward", "robust_gce", "robust_sce")


@pytest.mark.parametrize("method", ROBUST_VARIANTS)
def test_robust_variants_are_the_constraint_with_their_loss(method):
    from hessjax import losses as L
    from hessjax.noise import symmetric_transition

    cfg = TrainConfig(method=method, noise_rate=0.2, radius=0.05, radius_scale=1.0,
                      head_radius=0.05, lr=0.1, batch_size=8, epochs=2)  # fmt: skip
    model = _model()
    anchor = jax.tree.map(np.asarray, _params(model))
    m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
    t = symmetric_transition(0.2, num_classes=K)
    logits = jax.random.normal(jax.random.key(0), (5, K))
    y = np.array([0, 1, 2, 1, 0])
    expected = {
        "robust_clipped": L.backward_corrected_cross_entropy(logits, y, t, clip_negative=True),
        "robust_forward": L.forward_corrected_cross_entropy(logits, y, t),
        "robust_gce": L.generalized_cross_entropy(logits, y, q=cfg.gce_q),
        "robust_sce": L.symmetric_cross_entropy(logits, y, alpha=cfg.sce_alpha, beta=cfg.sce_beta),
    }[method]
    np.testing.assert_allclose(m.loss(logits, y), expected, rtol=1e-6)
    r = fit(model, m.loss, m.tx, _data(), None, config=cfg, progress=False)
    p = _params(r.model)
    for name in ("conv1", "conv2", "head"):
        d = np.linalg.norm(np.asarray(p[name]["kernel"]) - anchor[name]["kernel"])
        assert d <= 0.05 + 1e-5


@pytest.mark.parametrize("method", ("robust", *ROBUST_VARIANTS))
def test_resume_gives_the_same_parameters(tmp_path, method):
    kw = dict(epochs=3, checkpoint_every=1)
    full = _run(method, tmp_path / "full", **kw)

    class Kill(Exception):
        pass

    def killer(step, metrics):
        if step == 5:  # mid-way through epoch 2
            raise Kill

    model = _model()
    cfg = TrainConfig(method=method, noise_rate=0.2, lr=1e-2, batch_size=8, **kw)
    m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
    with pytest.raises(Kill):
        fit(
            model,
            m.loss,
            m.tx,
            _data(),
            _data(12, 1),
            config=cfg,
            workdir=tmp_path / "cut",
            callback=killer,
            progress=False,
        )
    resumed = _run(method, tmp_path / "cut", **kw)
    assert resumed.step == full.step == 9
    for a, b in zip(
        jax.tree.leaves(nnx.state(full.model)),
        jax.tree.leaves(nnx.state(resumed.model)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert [h["val_accuracy"] for h in full.history] == [h["val_accuracy"] for h in resumed.history]
    rows = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert len(rows) == 3 and (tmp_path / "cut" / "metrics.csv").exists()


def test_max_steps_then_resume(tmp_path):
    full = _run("plain", tmp_path / "a", epochs=2)
    part = _run("plain", tmp_path / "b", epochs=2, max_steps=4)
    assert part.stopped == "max_steps" and part.step == 4
    rest = _run("plain", tmp_path / "b", epochs=2)
    for a, b in zip(
        jax.tree.leaves(nnx.state(full.model)), jax.tree.leaves(nnx.state(rest.model)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    _run("plain", tmp_path, epochs=1)
    with pytest.raises(ValueError, match="config.lr"):
        model = _model()
        cfg = TrainConfig(method="plain", lr=5e-2, batch_size=8, epochs=1, noise_rate=0.2)
        m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
        fit(model, m.loss, m.tx, _data(), None, config=cfg, workdir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="model differs"):
        model = TinyCNN(K, 1, width=6, rngs=nnx.Rngs(0))
        cfg = TrainConfig(method="plain", lr=1e-2, batch_size=8, epochs=1, noise_rate=0.2)
        m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
        fit(model, m.loss, m.tx, _data(), None, config=cfg, workdir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        model = _model()
        cfg = TrainConfig(method="plain", lr=1e-2, batch_size=8, epochs=1, noise_rate=0.2)
        m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
        fit(
            model,
            m.loss,
            m.tx,
            _data(),
            None,
            config=cfg,
            workdir=tmp_path,
            resume=False,
            progress=False,
        )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _run("plain", tmp_path, epochs=1)
    last = tmp_path / "checkpoints" / "last"
    step_dir = sorted(p for p in last.iterdir() if p.name.isdigit())[-1]
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        _run("plain", tmp_path, epochs=2)


def test_early_stopping_stops_and_returns_the_best():
    model = _model()
    cfg = TrainConfig(
        method="plain_es", early_stopping=True, patience=1, lr=0.0 + 1e-9, batch_size=8, epochs=6
    )
    x, y = _data()
    m = build_method(cfg, _params(model), num_classes=K, steps_per_epoch=3)
    r = fit(model, m.loss, m.tx, (x, y), _data(12, 1), config=cfg, progress=False)
    # a zero head and a tiny lr: the accuracy cannot improve after epoch 1
    assert r.stopped == "early_stopping"
    assert len(r.history) == 2 and r.best_epoch == 1


def test_evaluate_matches_numpy():
    model = _model()
    x, y = _data(10)
    ev = evaluate(model, x, y, batch_size=4)  # padded last batch
    logits = np.asarray(model(x), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ev["loss"], -logp[np.arange(10), y].mean(), rtol=1e-5)
    np.testing.assert_allclose(ev["accuracy"], np.mean(logits.argmax(-1) == y))


def test_batch_larger_than_data_raises():
    model = _model()
    with pytest.raises(ValueError, match="batch_size"):
        fit(
            model,
            lambda lo, y: lo[:, 0],
            __import__("optax").sgd(0.1),
            _data(4),
            None,
            config=TrainConfig(batch_size=8),
            progress=False,
        )


def test_mobilenet_depth_groups():
    assert mobilenet_v2_stage_depth("features/2/conv/0/0/kernel") == 0
    assert mobilenet_v2_stage_depth("features/5/conv/2/kernel") == 1
    assert mobilenet_v2_stage_depth("features/10/conv/2/kernel") == 2
    assert mobilenet_v2_stage_depth("features/18/0/kernel") == 3
    assert mobilenet_v2_stage_depth("features/18/1/scale") is None
    assert symmetric_transition(0.2, num_classes=K).shape == (K, K)
