"""Fault injection: a run killed at any checkpoint boundary resumes bit-identically.

The loop kills itself (SIGKILL) at the k-th time a checkpoint write begins (``save_begin``),
has written best/ but not last/ (``best_end``), has written its versions (``save_end``) or has
committed them (``commit_end``), through the
``HESSJAX_FAULT`` hook of :mod:`hessjax.train.checkpoint`. The killed run is resumed by the
same command; its final parameters and metrics must equal an uninterrupted run's exactly. The
full sweep (every boundary of a tiny run, SIGTERM) is ``slow``; one kill, an interrupt
(KeyboardInterrupt, what SIGINT raises), a rerun of a finished run and a concurrent run are in
the default suite.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hessjax.cli import main
from hessjax.train import load_tree
from hessjax.train.checkpoint import FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
# 40 training images, batch 8: 5 steps an epoch; 2 epochs; commits at steps 2, 4, 5 (epoch
# end, with best), 6, 8, 10 (epoch end): 6 commits.
TINY = [
    "finetune", "--dataset", "digits", "--model", "tiny_cnn", "--n-per-class", "4",
    "--val-size", "30", "--test-size", "30", "--image-size", "8", "--batch-size", "8",
    "--lr", "1e-2", "--epochs", "2", "--checkpoint-every", "2", "--method", "l2sp",
    "--no-progress",
]  # fmt: skip
COMMITS = 6


def _cli(out, *extra, env=None, wait=True):
    cmd = [sys.executable, "-m", "hessjax.cli", *TINY, "--output-dir", str(out), *extra]
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    full_env.pop("XLA_FLAGS", None)
    if not wait:
        return subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    return subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True)


def _outcome(out: Path):
    """The final parameters and the metrics (without wall times) of a finished run."""
    from flax import nnx

    from hessjax.models import make_model

    model = make_model("tiny_cnn", 10, seed=0, in_channels=1)
    from hessjax.train import split_model

    _, _, params, rest = split_model(model)
    target = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    final = load_tree(out / "final", target)
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics:
        row.pop("time")
    results = json.loads((out / "results.json").read_text())
    keep = ("steps", "train_loss", "test_loss", "val_accuracy", "best_epoch", "stopped")
    return final, metrics, {k: results[k] for k in keep}


def _assert_same(a, b):
    import jax

    fa, ma, ra = a
    fb, mb, rb = b
    la, lb = jax.tree.leaves(fa), jax.tree.leaves(fb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ma == mb
    assert ra == rb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*TINY, "--output-dir", str(out)]) == 0
    return _outcome(out)


def _kill_and_resume(tmp_path, point, k, reference):
    out = tmp_path / f"{point}-{k}"
    killed = _cli(out, env={FAULT_ENV: f"{point}:{k}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main([*TINY, "--output-dir", str(out)]) == 0
    _assert_same(_outcome(out), reference)
    leftovers = [p.name for p in (out / "checkpoints").rglob("*") if "tmp" in p.name]
    assert not leftovers


def test_kill_after_a_write_resumes_bit_identically(tmp_path, reference):
    # the first epoch end: best/ written, last/ and the record not yet
    _kill_and_resume(tmp_path, "best_end", 1, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["save_begin", "save_end", "commit_end"])
@pytest.mark.parametrize("k", range(1, COMMITS + 1))
def test_kill_at_every_checkpoint_boundary(tmp_path, reference, point, k):
    _kill_and_resume(tmp_path, point, k, reference)


@pytest.mark.slow
def test_sigterm_mid_run_resumes_bit_identically(tmp_path, reference):
    out = tmp_path / "term"
    proc = _cli(out, "--epochs", "2", wait=False)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "commit.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert main([*TINY, "--output-dir", str(out)]) == 0
    _assert_same(_outcome(out), reference)


def test_interrupt_then_resume_and_rerun_of_a_finished_run(tmp_path, reference, capsys):
    """KeyboardInterrupt (SIGINT) from inside a step, a resume, then a rerun that is a no-op."""
    import hessjax.train.loop as loop

    out = tmp_path / "int"
    calls = {"n": 0}
    original = loop._Loop._commit

    def interrupting(self, state, meta, best=None):
        original(self, state, meta, best)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    loop._Loop._commit = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            main([*TINY, "--output-dir", str(out)])
    finally:
        loop._Loop._commit = original
    assert not (out / "results.json").exists()
    assert main([*TINY, "--output-dir", str(out)]) == 0
    _assert_same(_outcome(out), reference)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*TINY, "--output-dir", str(out)]) == 0
    assert main([*TINY, "--output-dir", str(out), "--checkpoint-every", "3"]) == 0
    assert "already holds this run, finished" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    _assert_same(_outcome(out), reference)


def test_a_second_concurrent_run_fails_at_once(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a live run in another process holds
    os.pwrite(fd, b"4242", 0)
    try:
        t0 = time.perf_counter()
        assert main([*TINY, "--output-dir", str(out)]) == 2
        assert time.perf_counter() - t0 < 30
        err = capsys.readouterr().err
        assert "in use by another run" in err and "4242" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(fd)
    # a lock left by a dead process is stale: the next run takes it over
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "1"]) == 0
