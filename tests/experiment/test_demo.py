"""hessjax.experiment.demo: the candidates, the bound's pick and the files, on a tiny problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hessjax.cli import main
from hessjax.experiment import DemoConfig, demo

TINY = dict(dataset="digits", model="tiny_cnn", image_size=8, n_per_class=3, val_size=30,
            test_size=30, batch_size=8, train_from=0, epochs=1, num_iters=2, radii=(0.5,))  # fmt: skip


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo(DemoConfig(**TINY, output_dir=str(out)), progress=False, command="test")


def test_candidates_pick_and_files(ran):
    out, summary = ran
    rows = summary["rows"]
    assert [r["candidate"] for r in rows] == [
        "plain", "robust D=1 head=4 (paper)", "constraint D=0.5 head=2"]  # fmt: skip
    bounds = [r["bound"] for r in rows]
    assert [r["chosen"] for r in rows] == [i == int(np.argmin(bounds)) for i in range(3)]
    assert summary["chosen"] == rows[int(np.argmin(bounds))]["options"]
    # the pick is select_by_bound's (its positive-part bound), the reported columns its runs'
    sel = summary["select"]
    assert summary["chosen"] == sel["chosen"] and sel["criterion"] == "positive"
    for row, srow in zip(rows, sel["table"], strict=True):
        res = json.loads((Path(srow["run"]) / "results.json").read_text())
        assert (
            row["test_accuracy"] == res["test_accuracy"] and row["bound"] == srow["bound_positive"]
        )
        assert row["measure_vs_plain"] == pytest.approx(
            srow["measure"] / sel["table"][0]["measure"]
        )
        assert row["bound_above_test_loss"] == (row["bound"] >= res["test_loss"])
    best_val = int(np.argmax([r["val_accuracy"] for r in rows]))
    assert summary["validation_choice"] == rows[best_val]["options"]
    on_disk = json.loads((out / "demo.json").read_text())
    assert on_disk["command"] == "test" and on_disk["rows"] == json.loads(json.dumps(rows))
    assert (out / "demo.png").stat().st_size > 0 and (out / "runs" / "select.json").exists()


def test_rerun_reuses_runs_and_measures(ran):
    out, first = ran
    again = demo(DemoConfig(**TINY, output_dir=str(out)), progress=False, command="test")
    assert all(r["reused"] and r["measure_reused"] for r in again["select"]["table"])
    assert [r["bound"] for r in again["rows"]] == [r["bound"] for r in first["rows"]]


def test_cli_passes_radii(ran, capsys):
    out, first = ran
    args = ["demo", "--dataset", "digits", "--model", "tiny_cnn", "--image-size", "8",
            "--n-per-class", "3", "--val-size", "30", "--test-size", "30", "--batch-size", "8",
            "--train-from", "0", "--epochs", "1", "--num-iters", "2", "--radii", "0.5",
            "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chosen by the bound (training data only)" in printed and "constraint D=0.5" in printed


@pytest.mark.parametrize(
    "bad, name", [(dict(radii=()), "radii"), (dict(radii=(0.5, -1.0)), "radii"),
                  (dict(head_factor=float("nan")), "head_factor")])  # fmt: skip
def test_bad_options_are_named(bad, name):
    with pytest.raises(ValueError, match=name):
        DemoConfig(**bad)
