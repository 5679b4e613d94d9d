"""Smoke tests of the ``hessjax`` command line on tiny data (digits, tiny_cnn), in-process."""

from __future__ import annotations

import json

import pytest

from hessjax.cli import main

TINY = [
    "--dataset", "digits", "--model", "tiny_cnn", "--n-per-class", "4", "--val-size", "30",
    "--test-size", "30", "--image-size", "8", "--batch-size", "8", "--lr", "1e-2",
    "--no-progress",
]  # fmt: skip


def test_finetune_then_measure(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", *TINY, "--method", "robust", "--epochs", "1", "--max-steps", "2"]
    assert main([*args, "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["stopped"] == "max_steps"
    assert (out / "checkpoints" / "last").exists() and (out / "anchor").exists()
    # the same command again resumes and finishes the epoch (5 steps of 8 from 40 examples)
    assert main([*args[:-2], "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 5 and len(res["history"]) == 1
    assert json.loads((out / "metrics.json").read_text())[0]["epoch"] == 1
    capsys.readouterr()
    assert main(["measure", str(out), "--examples", "3", "--num-iters", "2"]) == 0
    printed = capsys.readouterr().out
    assert "measure = sum_i sqrt(calH_i / n)" in printed and "bound" in printed
    m = json.loads((out / "measure.json").read_text())
    assert m["canonical"]["measure"] >= 0 and m["num_layers"] == 3
    assert m["canonical"]["bound"] >= m["train_loss"]


def test_mismatched_resume_is_a_clear_error(tmp_path):
    out = str(tmp_path / "run")
    base = ["finetune", *TINY, "--epochs", "1", "--max-steps", "1", "--output-dir", out]
    main(base)
    with pytest.raises(ValueError, match="config.lr"):
        main([*base, "--lr", "0.5"])


def test_measure_without_a_run_names_it(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        main(["measure", str(tmp_path)])


def test_help_documents_every_option(capsys):
    for cmd in ("finetune", "measure", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--seed" in text
        if cmd == "finetune":
            for option in ("--method", "--transition", "--noise-rate", "--radius", "--resume"):
                assert option in text, option


def test_dual_t_transition_and_best_checkpoint(tmp_path, capsys):
    """The paper's algorithm with T estimated by Dual-T from a plain run's predictions."""
    import numpy as np

    out = tmp_path / "run"
    tiny = [a if a != "4" else "25" for a in TINY]  # 25 per class: the plain model must learn
    args = ["finetune", *tiny, "--method", "robust", "--transition", "dual_t",
            "--noise-rate", "0.2", "--epochs", "12", "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    t = np.asarray(json.loads((out / "transition.json").read_text()))
    assert t.shape == (10, 10)
    assert np.all(t >= -1e-6)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-4)
    assert (out / "dual_t_plain" / "results.json").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "robust" and len(res["history"]) >= 1
    capsys.readouterr()
    assert main(["measure", str(out), "--examples", "2", "--num-iters", "2",
                 "--checkpoint", "best"]) == 0  # fmt: skip
    m = json.loads((out / "measure.json").read_text())
    assert np.isfinite(m["canonical"]["measure"])
