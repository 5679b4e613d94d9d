"""Smoke tests of the experiment scripts: each --smoke preset in-process, into tmp_path."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "smoke" and "command" in config and "commit" in config
    assert (out / "metrics.json").exists() and (out / "table.md").exists()
    return json.loads((out / "metrics.json").read_text())


def test_measure_vs_gap_smoke(tmp_path):
    mod = _load("measure_vs_gap")
    mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    metrics = _common(tmp_path)
    rows = metrics["rows"]
    assert len(rows) == len(mod.run_specs(mod.PRESETS["smoke"])) >= 3
    table = (tmp_path / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(rows)
    for r in rows:
        assert r["measure"] >= 0 and r["measure_ref"] == r["measure_ref"]
        assert r["bound"] >= r["train_loss"] and r["corollary"] >= r["train_loss"]
        assert math.isfinite(r["log10_classical"])
    s = metrics["summary"]
    for variant in ("canonical", "reference"):
        for k in ("pearson", "spearman"):
            v = s[variant][k]
            assert v is None or -1 - 1e-9 <= v <= 1 + 1e-9
    assert (tmp_path / "measure_vs_gap.png").exists() and (tmp_path / "radius.png").exists()
    # --restat: the statistics again from metrics.json (bootstrap intervals, the bound vs C)
    stats = mod.main(["--restat", "--out", str(tmp_path), "--restat-out", str(tmp_path / "st")])
    assert (tmp_path / "st" / "stats.json").exists()
    k = stats["summary"]["canonical"]
    if k["kendall"] is not None:
        assert k["ci95"]["kendall"][0] <= k["kendall"] <= k["ci95"]["kendall"][1]
    for m in stats["per_model"]:  # the bound lies above the test loss exactly when C >= C*
        for c, above in m["above_test"].items():
            if c != "max_train_loss":
                assert above == (float(c) >= m["c_star"] - 1e-9)


def test_measure_vs_gap_canonical_only(tmp_path, monkeypatch):
    """A preset with variant "canonical" and no trace probes (cpu_image_full's options): no
    reference measure, no Corollary, the same canonical rows."""
    mod = _load("measure_vs_gap")
    preset = dict(mod.PRESETS["smoke"], variant="canonical", trace_probes=0, radii=[0.5])
    monkeypatch.setitem(mod.PRESETS, "smoke", preset)
    mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    metrics = _common(tmp_path)
    assert len(metrics["rows"]) == len(mod.run_specs(preset))
    for r in metrics["rows"]:
        assert r["measure_ref"] is None and r["corollary"] is None
        assert r["measure"] >= 0 and r["bound"] >= r["train_loss"]
        measured = json.loads((tmp_path / "runs" / r["name"] / "measure.json").read_text())
        assert "reference" not in measured and "corollary" not in measured
    assert metrics["summary"]["reference"] is None
    assert set(mod.PRESETS["cpu_image_full"]) >= set(mod.PRESETS["cpu"])


def test_noisy_labels_smoke(tmp_path):
    mod = _load("noisy_labels")
    mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    metrics = _common(tmp_path)
    c = mod.PRESETS["smoke"]
    assert len(metrics["results"]) == len(c["methods"]) * len(c["noises"]) * len(c["seeds"])
    # the protocol: tuned on the tuning seed from the grid, reported on fresh seeds
    robust = metrics["protocol"]["symmetric0.4"]["robust"]
    assert robust["chosen"]["radius"] in robust["grid"]["radius"]
    assert {t["hparams"]["radius"] for t in robust["trials"]} == set(robust["grid"]["radius"])
    assert set(c["grids"]["robust"]["radius"]) <= set(robust["grid"]["radius"])  # widened?
    assert {r["seed"] for r in metrics["results"]} == set(c["seeds"]) and c["tune_seed"] not in c[
        "seeds"
    ]
    for r in metrics["results"]:
        assert 0 <= r["test_accuracy"] <= 1 and r["measure"] >= 0
        assert r["num_examples"] == min(c["examples"], 60) and r["num_iters"] == c["num_iters"]
    run = json.loads(
        (tmp_path / "runs" / "symmetric0.4" / "plain" / "default_s1" / "config.json").read_text()
    )
    assert run["early_stopping"] and run["patience"] == c["patience"]  # every method
    comp = metrics["summary"]["comparison"]["symmetric0.4"]["robust"]
    assert comp["paired"]["low"] <= comp["paired"]["mean"] <= comp["paired"]["high"]
    assert "robust" in metrics["summary"]["average_gain"]
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "measure.png").exists()
    assert metrics["missing"] == [] and metrics["partial"] is False
    # --summary-only re-tabulates finished runs without training; a deleted run is listed
    config = (tmp_path / "config.json").read_text()
    gone = tmp_path / "runs" / "symmetric0.4" / "plain" / "default_s1" / "results.json"
    gone.unlink()
    again = mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress",
                      "--summary-only"])  # fmt: skip
    assert again["partial"] and len(again["missing"]) == 1 and "plain" in again["missing"][0]
    assert len(again["results"]) == len(metrics["results"]) - 1
    assert not gone.exists() and (tmp_path / "config.json").read_text() == config


def test_noisy_labels_plots_skip_a_figure_without_values(tmp_path):
    """Under --skip-measure every measure is NaN: no empty measure.png (a stale one goes)."""
    mod = _load("noisy_labels")
    rows = [{"noise": "symmetric0.4", "method": m, "acc_mean": a, "acc_std": 0.01,
             "measure_mean": math.nan, "measure_std": math.nan}
            for m, a in (("plain", 0.6), ("robust", 0.7))]  # fmt: skip
    (tmp_path / "measure.png").write_bytes(b"stale")
    mod.plots(rows, {"methods": ["plain", "robust"]}, tmp_path)
    assert (tmp_path / "accuracy.png").exists() and not (tmp_path / "measure.png").exists()


def test_noisy_labels_grids_override_the_preset(tmp_path):
    """--grids replaces a method's search grid (with --widen 0 beside it); nothing trains with
    --summary-only, so every tuning run of the new grid is listed as missing. (Whether --widen
    stops the widening needs trained runs: the smoke test covers widening itself.)"""
    mod = _load("noisy_labels")
    grids = '{"robust": {"radius": [0.5, 2.0], "head_radius": [3.0]}}'
    out = mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress", "--summary-only",
                    "--methods", "robust", "--grids", grids, "--widen", "0"])  # fmt: skip
    robust = out["protocol"]["symmetric0.4"]["robust"]
    assert robust["grid"]["radius"] == [0.5, 2.0] and robust["grid"]["head_radius"] == [3.0]
    trials = [m for m in out["missing"] if isinstance(m, dict)]  # the untrained tuning runs
    assert sorted(m["radius"] for m in trials) == [0.5, 2.0]
    assert all(m["head_radius"] == 3.0 and m["method"] == "robust" for m in trials)
    assert out["results"] == [] and out["partial"]
    with pytest.raises(SystemExit):
        mod.parse_args(["--grids", "{not json"])


def test_spectrum_smoke(tmp_path):
    mod = _load("spectrum")
    mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    metrics = _common(tmp_path)
    for model in ("pretrained", "finetuned"):
        m = metrics[model]
        assert len(m["max_trace"]) == len(m["layers"]) == len(m["top_eigenvalues"])
        assert all(t >= -1e-6 for t in m["max_trace"])
        assert len(m["density"]) == len(m["density_grid"])
    for name in ("traces.png", "eigenvalues.png", "density.png"):
        assert (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["measure_vs_gap", "noisy_labels", "spectrum"])
def test_presets_documented(name):
    mod = _load(name)
    assert {"smoke", "cpu", "gpu"} <= set(mod.PRESETS)
    assert "--preset gpu" in mod.__doc__


def test_noisy_labels_presets_make_valid_run_configs(tmp_path):
    """Every preset's every method (at the search's start) is a valid run, without training."""
    from hessjax.experiment import GRIDS, RunConfig
    from hessjax.experiment.protocol import START

    mod = _load("noisy_labels")
    for name, c in mod.PRESETS.items():
        grids = c["grids"] or GRIDS
        assert c["tune_seed"] not in c["seeds"], name
        for method in c["methods"]:
            hp = {k: START.get(k, v[0]) for k, v in grids[method].items()} | {"method": method}
            cfg = RunConfig.from_dict(mod.run_config(c, tmp_path, c["noises"][0], hp, 1))
            assert cfg.early_stopping and cfg.patience == c["patience"], (name, method)


def test_bound_selection_smoke(tmp_path):
    """Per seed: bound-selected = argmin of select_by_bound's bounds, validation-selected = argmax
    of clean val accuracy over the same final checkpoints, oracle = argmax of test accuracy."""
    mod = _load("bound_selection")
    mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    metrics = _common(tmp_path)
    c = mod.PRESETS["smoke"]
    assert [s["seed"] for s in metrics["seeds"]] == c["seeds"] and not metrics["partial"]
    for s in metrics["seeds"]:
        sel = json.loads((tmp_path / "runs" / f"seed{s['seed']}" / "select.json").read_text())
        assert [r["candidate"] for r in sel["table"]] == c["grid"]
        bounds = [r["bound_positive"] for r in sel["table"]]  # select_by_bound's default
        backward = [r["bound"] for r in sel["table"]]
        val = [r["reported"]["val_accuracy"] for r in sel["table"]]
        test = [r["reported"]["test_accuracy"] for r in sel["table"]]
        picks = s["picks"]
        assert picks["backward_bound"]["index"] == backward.index(min(backward))
        assert picks["bound"]["index"] == bounds.index(min(bounds)) == sel["chosen_index"]
        assert picks["validation"]["index"] == val.index(max(val))  # ties: the first
        assert picks["oracle"]["index"] == test.index(max(test))
        assert picks["bound"]["test_accuracy"] == test[picks["bound"]["index"]]
        noisy = [r["train_ce_noisy"] + math.sqrt(r["clip"]) * r["measure"] for r in sel["table"]]
        assert picks["noisy_ce_bound"]["index"] == noisy.index(min(noisy))  # the diagnostic
        for r in sel["table"]:  # final checkpoints, no early stopping, T symmetric at 0.4
            run = json.loads((Path(r["run"]) / "config.json").read_text())
            assert not run["early_stopping"] and run["seed"] == s["seed"]
            assert run["transition"] == "symmetric" and run["assumed_rate"] == 0.4
            assert r["n"] == run["n_per_class"] * 10  # the measure over every training example
        for k in ("spearman_bound_test_loss", "spearman_bound_test_error"):
            assert s[k] is None or -1 - 1e-9 <= s[k] <= 1 + 1e-9
    summary = metrics["summary"]
    assert set(summary["test_accuracy"]) == {"bound", "backward_bound", "validation", "oracle",
                                              "noisy_ce_bound"}  # fmt: skip
    for pick, counts in summary["counts"].items():
        assert sum(counts.values()) == len(c["seeds"]), pick
    d = summary["paired"]["bound-validation"]
    assert d["n"] == len(c["seeds"]) and d["low"] <= d["mean"] <= d["high"]
    assert summary["test_accuracy"]["oracle"]["mean"] >= summary["test_accuracy"]["bound"]["mean"]
    assert len(summary["per_candidate"]) == len(c["grid"])
    # --summary-only re-tabulates without training; a seed without its select.json is missing
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "runs" / "seed2" / "select.json").unlink()
    again = mod.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress",
                      "--summary-only"])  # fmt: skip
    assert again["partial"] and again["missing_seeds"] == [2]
    assert again["seeds"] == metrics["seeds"][:1]
    assert (tmp_path / "config.json").read_text() == config


def test_quadform_steps_rejects_bad_steps():
    """The argument is checked before any model is loaded, and the message names it."""
    mod = _load("quadform_steps")
    with pytest.raises(SystemExit, match="--steps"):
        mod.main(["--steps", "20", "0"])


def test_bench_peers_speedups_per_product(tmp_path):
    """The peer that stops early wins on wall clock but not per product (closed form)."""
    mod = _load("bench_peers")
    ours = {"hutchinson": {"median_s": 10.0, "products": 100}, "hvp": {"median_s": 0.1,
            "products": 1}}  # fmt: skip
    peers = {
        "hutchinson/early": {"median_s": 1.0, "products": 2},  # 0.5 s per product
        "hutchinson/full": {"median_s": 40.0, "products": 100},  # 0.4 s per product
        "hvp/a": {"median_s": 0.4, "products": 1},
    }
    out = mod._speedups(ours, peers)
    h = out["hutchinson"]
    assert h["fastest_peer"] == "hutchinson/early" and h["speedup"] == pytest.approx(0.1)
    assert h["fastest_peer_per_product"] == "hutchinson/full"
    assert h["speedup_per_product"] == pytest.approx(0.4 / 0.1)
    assert out["hvp"]["speedup"] == pytest.approx(4.0) == out["hvp"]["speedup_per_product"]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"hessjax": {"summary": ours}, "torch": {"summary": peers}}))
    assert mod.main(["--resummarise", "--out", str(path)])["speedup_vs_fastest_peer"] == out
    path.write_text(json.dumps({"hessjax": {"summary": ours}}))
    with pytest.raises(ValueError, match="no torch side"):
        mod.main(["--resummarise", "--out", str(path)])
