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


def test_mismatched_resume_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["finetune", *TINY, "--epochs", "1", "--max-steps", "1", "--output-dir", out]
    main(base)
    capsys.readouterr()
    assert main([*base, "--lr", "0.5"]) == 2
    assert "config.lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="config.lr"):  # --debug: the exception itself
        main([*base, "--lr", "0.5", "--debug"])


def test_measure_without_a_run_names_it(tmp_path, capsys):
    assert main(["measure", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1


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


def test_measure_run_equals_measure_of_the_runs_closure(tmp_path):
    """measure_run's stable {"params", "rest"} loss gives the numbers of the plain closure
    over the checkpoint (hessian_distance on Run.example_loss, Run.params, Run.anchor), and
    two runs of one model structure share one loss object (one compile)."""
    import jax.numpy as jnp
    import numpy as np

    from hessjax.experiment import load_run, measure_run
    from hessjax.measures import hessian_distance

    runs = []
    for seed in ("0", "1"):
        out = tmp_path / f"run{seed}"
        main(["finetune", *TINY, "--epochs", "1", "--seed", seed, "--method", "l2sp",
              "--output-dir", str(out)])  # fmt: skip
        runs.append(out)
    got = measure_run(runs[1], num_examples=4, num_iters=3, variant="both", seed=2)
    assert got["psd_blocks"]  # the tiny CNN is piecewise linear: the fast exact path
    r, r0 = load_run(runs[1]), load_run(runs[0])
    assert r.state_loss is r0.state_loss
    idx = np.random.default_rng(2).permutation(len(r.splits.train_labels))[:4]
    ex = (jnp.asarray(r.splits.train_images[idx]), jnp.asarray(r.splits.train_labels[idx]))
    n = len(r.splits.train_labels)
    for variant in ("canonical", "reference"):
        want = hessian_distance(r.example_loss, r.params, r.anchor, ex, n=n, num_iters=3,
                                partition=r.partition, variant=variant)  # fmt: skip
        np.testing.assert_allclose(got[variant]["measure"], float(want.measure), rtol=1e-5)
        rows = got[variant]["report"]["layers"]
        assert [row["layer"] for row in rows] == list(r.partition.names)


def test_train_from_fine_tunes_the_later_blocks_only(tmp_path, capsys):
    """--train-from 17: the model holds features.17-18 and the head; the frozen blocks'
    outputs are its input; measure covers exactly the fine-tuned kernels."""
    out = tmp_path / "run"
    args = ["finetune", "--dataset", "digits", "--model", "mobilenet_v2", "--train-from", "17",
            "--n-per-class", "2", "--val-size", "20", "--test-size", "20", "--image-size", "32",
            "--batch-size", "8", "--epochs", "1", "--method", "robust", "--no-progress",
            "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["n_train"] == 20
    assert main(["measure", str(out), "--examples", "2", "--num-iters", "2"]) == 0
    m = json.loads((out / "measure.json").read_text())
    names = [row["layer"] for row in m["canonical"]["report"]["layers"]]
    assert sorted(names) == ["classifier/1/kernel", "features/17/conv/0/0/kernel",
                             "features/17/conv/1/0/kernel", "features/17/conv/2/kernel",
                             "features/18/0/kernel"]  # fmt: skip
    assert "features.17-18" in m["layers"]
    capsys.readouterr()
    assert main(["finetune", *TINY, "--train-from", "3", "--output-dir", str(tmp_path / "x")]) == 2
    assert "train_from" in capsys.readouterr().err


def test_select_prints_the_table_and_the_argmin_of_the_bounds(tmp_path, capsys):
    base = ["select", *TINY, "--n-per-class", "2", "--method", "robust", "--epochs", "1",
            "--num-iters", "2"]  # fmt: skip
    out = tmp_path / "sel"
    assert main([*base, "--head-radii", "0", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "select.json").read_text())
    bounds = [row["bound_positive"] for row in saved["table"]]  # the default criterion
    assert [row["candidate"] for row in saved["table"]] == [{"head_radius": h} for h in (0.0, 2.0)]
    assert saved["chosen_index"] == bounds.index(min(bounds))
    assert saved["criterion"] == "positive"
    chosen = f"head_radius={saved['chosen']['head_radius']}"
    assert f"chosen by the bound (bound_positive): {chosen}" in printed
    assert "head_radius=2.0" in printed
    assert "reported, not used" in printed
    # no grid; early stopping (it reads the clean validation set): exit 2, the option named
    assert main([*base, "--output-dir", str(tmp_path / "x")]) == 2
    assert "grid" in capsys.readouterr().err
    assert main([*base, "--radii", "1", "--early-stopping", "--output-dir", str(out)]) == 2
    assert "early_stopping" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    usage = capsys.readouterr().out  # read once: readouterr() empties the buffer
    assert all(o in usage for o in ("--radii", "--head-radii", "--methods"))
