"""hessjax.experiment.select_by_bound: the choice is the argmin of the recomputed bounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hessjax.experiment import RunConfig, load_run, measure_run, select_by_bound

TINY = dict(dataset="digits", model="tiny_cnn", image_size=8, n_per_class=3, val_size=30,
            test_size=30, batch_size=8, lr=1e-2, epochs=1, noise_rate=0.4, method="robust")  # fmt: skip
# head radius 0: the zero head stays zero, so no kernel moves (the body gets no gradient
# through a zero head): measure 0 and bound = training loss
GRID = [{"head_radius": 0.0}, {"head_radius": 4.0, "radius": 2.0}]
ITERS = 3


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    cfg = RunConfig(**TINY, output_dir=str(tmp_path_factory.mktemp("select")))
    return cfg, select_by_bound(cfg, GRID, num_iters=ITERS, progress=False, command="test")


def _recomputed(row) -> tuple[float, float, float, float, float]:
    """(train loss, C, kernels moved, positive-part loss, its C) from the run's logits and T,
    in numpy."""
    r = load_run(row["run"])
    logits = np.asarray(r.model(r.splits.train_images), np.float64)
    labels = np.asarray(r.splits.train_labels)
    ce = np.log(np.exp(logits).sum(1, keepdims=True)) - logits  # (n, k): CE of every label
    t = np.array(json.loads((Path(row["run"]) / "transition.json").read_text()))
    inv = np.linalg.inv(t)
    per_example = np.sum(inv[labels] * ce, axis=1)
    loss, positive = float(np.mean(per_example)), float(np.mean(np.maximum(per_example, 0)))
    c_pos = ce.max() * np.clip(inv, 0, None).sum(1).max()
    c = c_pos + ce.max() * np.clip(-inv, 0, None).sum(1).max()
    moved = sum(float(np.abs(np.asarray(r.params[m]["kernel"]) - r.anchor[m]["kernel"]).sum())
                for m in ("conv1", "conv2", "head"))  # fmt: skip
    return loss, float(c), moved, positive, float(c_pos)


def test_choice_is_the_argmin_of_the_recomputed_bounds(selected):
    cfg, out = selected
    table = out["table"]
    assert [row["candidate"] for row in table] == GRID
    assert out["chosen"] == GRID[out["chosen_index"]]
    bounds, positives = [], []
    for row in table:
        loss, c, moved, positive, c_pos = _recomputed(row)
        assert row["train_loss_positive"] == pytest.approx(positive, rel=1e-4, abs=1e-5)
        assert row["C_positive"] == pytest.approx(c_pos, rel=1e-4)
        assert positive >= loss
        assert row["train_loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
        assert row["C"] == pytest.approx(c, rel=1e-4) and row["measure_exact"]
        if row["candidate"]["head_radius"] == 0.0:  # no movement: the measure is 0 in closed form
            assert moved == 0.0 and row["measure"] == 0.0
            measure = 0.0
        else:
            assert moved > 0
            m = measure_run(row["run"], num_examples=None, num_iters=ITERS)
            assert m["num_examples"] == m["n"] == 30  # every training example
            measure = m["measure"]
            assert measure > 0 and row["measure"] == pytest.approx(measure, rel=1e-5)
        bounds.append(loss + math.sqrt(c) * measure)
        assert row["bound"] == pytest.approx(bounds[-1], rel=1e-4)
        positives.append(positive + math.sqrt(c_pos) * measure)
        assert row["bound_positive"] == pytest.approx(positives[-1], rel=1e-4)
    assert out["criterion"] == "positive"
    assert out["chosen_index"] == int(np.argmin(positives))
    backward = select_by_bound(
        cfg, GRID, num_iters=ITERS, criterion="backward", progress=False, command="test"
    )
    assert backward["chosen_index"] == int(np.argmin(bounds))  # same runs, the other column
    assert table[0]["bound"] == pytest.approx(table[0]["train_loss"])
    saved = json.loads((Path(cfg.output_dir) / "select.json").read_text())
    assert saved["chosen"] == out["chosen"] and saved["command"] == "test"
    assert saved["seed"] == cfg.seed and "commit" in saved
    assert set(saved["table"][0]["reported"]) == {"val_accuracy", "test_accuracy", "test_loss"}


def test_rerun_reuses_the_runs_and_their_measures(selected):
    cfg, first = selected
    finals = [Path(row["run"]) / "results.json" for row in first["table"]]
    stamps = [p.stat().st_mtime_ns for p in finals]
    again = select_by_bound(cfg, GRID, num_iters=ITERS, progress=False, command="test")
    assert all(row["reused"] and row["measure_reused"] for row in again["table"])
    assert [p.stat().st_mtime_ns for p in finals] == stamps
    assert [r["bound"] for r in again["table"]] == [r["bound"] for r in first["table"]]
    assert again["chosen"] == first["chosen"]


@pytest.mark.parametrize(
    ("grid", "changes", "kwargs", "names"),
    [
        ([], {}, {}, "grid"),
        ({}, {}, {}, "grid"),
        ([{"method": "nope"}], {}, {}, "grid\\[0\\]: method"),
        ([{"radius": 1.0}, {"radius": -1.0}], {}, {}, "grid\\[1\\].radius"),
        ([{"head_radius": -0.5}], {}, {}, "grid\\[0\\].head_radius"),
        ({"radius": []}, {}, {}, "grid: 'radius'"),
        ([{"dataset": "digits"}], {}, {}, "grid\\[0\\]: options \\['dataset'\\]"),
        ([{"radius": 1.0}, {"radius": 1.0}], {}, {}, "grid: a candidate is listed twice"),
        ([{"radius": 1.0}], {"early_stopping": True}, {}, "early_stopping"),
        ([{"method": "plain_es"}], {}, {}, "grid\\[0\\].method"),
        ([{"radius": 1.0}], {}, {"loss_bound": -1.0}, "loss_bound"),
        ([{"radius": 1.0}], {}, {"criterion": "nope"}, "criterion"),
    ],
)
def test_bad_input_raises_before_training(tmp_path, grid, changes, kwargs, names):
    cfg = RunConfig(**TINY, output_dir=str(tmp_path / "sel")).replace(**changes)
    with pytest.raises(ValueError, match=names):
        select_by_bound(cfg, grid, progress=False, **kwargs)
    assert not (tmp_path / "sel").exists()
