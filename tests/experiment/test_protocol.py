"""hessjax.experiment.protocol: the tuning driver and the statistics (closed forms, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hessjax.experiment import protocol as P


def test_grids_have_at_least_four_values_and_starts_inside():
    for method, grid in P.GRIDS.items():
        for name, values in grid.items():
            assert len(values) >= 4, (method, name)
            assert P.START[name] in values, (method, name)
    # the radius grids span the reference code's tuned ResNet-18 radii (8-11 body, 6-20 head)
    assert min(P.RADII) < 8 and max(P.RADII) > 11
    assert min(P.HEAD_RADII) < 6 and max(P.HEAD_RADII) > 20


def test_coordinate_search_finds_separable_optimum_once_per_config():
    calls = []

    def run(hp, seed):
        calls.append(tuple(sorted(hp.items())))
        return {"val_accuracy": -((hp["a"] - 3) ** 2) - (hp["b"] - 0.5) ** 2}

    grid = {"a": (1, 2, 3, 4), "b": (0.1, 0.5, 0.9, 2.0)}
    chosen, trials = P.coordinate_search(run, grid, seed=0, start={"a": 1, "b": 0.1})
    assert chosen == {"a": 3, "b": 0.5}
    assert len(calls) == len(set(calls)) == len(trials) == 4 + 4 - 1  # shared point reused
    assert P.grid_edges(chosen, grid) == {"a": "inside", "b": "inside"}


def test_coordinate_search_skips_failures_and_breaks_ties_low():
    def run(hp, seed):
        if hp["r"] == 1:
            return {"error": "transition: singular"}
        return {"val_accuracy": 0.5}

    chosen, trials = P.coordinate_search(run, {"r": (1, 2, 3, 4)}, seed=0, start={})
    assert chosen == {"r": 2}
    assert trials[0]["error"].startswith("transition") and math.isnan(trials[0]["val_accuracy"])


def test_coordinate_search_passes_revisit_interacting_coordinates():
    """f = -(a - b)^2 - (b - 3)^2 / 2 on {0..3}^2 from (0, 0): one sweep stops at (0, 1), each
    further sweep moves one step, and the search ends at the coordinate-wise optimum (2, 2) in
    the sweep that changes nothing (worked out by hand)."""

    def search(passes):
        calls = []

        def run(hp, seed):
            calls.append(tuple(sorted(hp.items())))
            return {"val_accuracy": -((hp["a"] - hp["b"]) ** 2) - 0.5 * (hp["b"] - 3) ** 2}

        grid = {"a": (0, 1, 2, 3), "b": (0, 1, 2, 3)}
        chosen, trials = P.coordinate_search(run, grid, seed=0, start={"a": 0, "b": 0},
                                             passes=passes)  # fmt: skip
        assert len(calls) == len(set(calls)) == len(trials)
        return chosen, calls

    assert search(1)[0] == {"a": 0, "b": 1}
    assert search(2)[0] == {"a": 1, "b": 2}
    chosen, calls = search(10)
    assert chosen == {"a": 2, "b": 2}
    assert calls == search(4)[1]  # sweep 4 changed nothing: no sweep 5
    # 4 + 3, 3 + 2, 2 + 1 new configurations in sweeps 1-3, none in 4; (3, 3), the global
    # optimum, is never tried: a coordinate search's limit
    assert len(calls) == 15 and (("a", 3), ("b", 3)) not in calls
    with pytest.raises(ValueError, match="passes"):
        P.coordinate_search(lambda h, s: {"val_accuracy": 0.0}, {"a": (1, 2)}, seed=0, passes=0)


def test_tune_then_seeds_runs_chosen_on_fresh_seeds():
    seen = []

    def run(hp, seed):
        seen.append((hp["method"], seed))
        return {"val_accuracy": hp.get("smoothing", 0.0) * (seed == 0), "seed": seed}

    out = P.tune_then_seeds(run, ["plain", "label_smoothing"], tune_seed=0, seeds=[1, 2, 3])
    assert out["label_smoothing"]["chosen"] == {"smoothing": 0.4}
    assert out["label_smoothing"]["edges"] == {"smoothing": "high"}
    assert out["plain"]["chosen"] == {} and len(out["plain"]["trials"]) == 1
    assert sorted(out["plain"]["runs"]) == [1, 2, 3]
    assert [s for m, s in seen if m == "label_smoothing"] == [0, 0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="tune_seed"):
        P.tune_then_seeds(run, ["plain"], tune_seed=1, seeds=[1, 2])
    with pytest.raises(ValueError, match="no grid"):
        P.tune_then_seeds(run, ["nope"], tune_seed=0, seeds=[1])


def test_correlations_closed_forms():
    # y = x^3: monotone, so Spearman = Kendall = 1 while Pearson < 1
    x = np.arange(1.0, 8.0)
    r = P.correlations(x, x**3)
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)
    assert 0.9 < r["pearson"] < 1.0
    r = P.correlations(x, -2 * x + 1)
    assert r == pytest.approx({"pearson": -1.0, "spearman": -1.0, "kendall": -1.0})
    # one swapped pair of n: Kendall = 1 - 4/(n(n-1)), Spearman = 1 - 6*2/(n(n^2-1))
    n = 6
    y = np.arange(n, dtype=float)
    y[[2, 3]] = y[[3, 2]]
    r = P.correlations(np.arange(n), y)
    assert r["kendall"] == pytest.approx(1 - 4 / (n * (n - 1)))
    assert r["spearman"] == pytest.approx(1 - 12 / (n * (n * n - 1)))
    assert math.isnan(P.correlations([1, 1, 1], [1, 2, 3])["pearson"])
    for bad in (([1, 2], [1, 2]), ([1, 2, 3], [1, 2]), ([1, 2, np.nan], [1, 2, 3])):
        with pytest.raises(ValueError):
            P.correlations(*bad)


def test_correlations_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 5, 20).astype(float)  # many ties
        y = x + rng.normal(size=20)
        y[:4] = y[4]
        r = P.correlations(x, y)
        assert r["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert r["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert r["kendall"] == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)  # tau-b


def test_bootstrap_interval_covers_and_shrinks():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 0.6 * x + 0.8 * rng.normal(size=200)  # population Pearson 0.6
    b = P.bootstrap_correlations(x, y, seed=0, num_resamples=500)
    for k in ("pearson", "spearman", "kendall"):
        assert b[k]["low"] <= b[k]["estimate"] <= b[k]["high"]
    assert b["pearson"]["low"] < 0.6 < b["pearson"]["high"]
    # Fisher z: the 95% interval half-width is about 1.96 / sqrt(n - 3) * (1 - r^2)
    width = b["pearson"]["high"] - b["pearson"]["low"]
    assert width == pytest.approx(2 * 1.96 * (1 - 0.36) / math.sqrt(197), rel=0.35)
    again = P.bootstrap_correlations(x, y, seed=0, num_resamples=500)
    assert again == b  # seeded
    small = P.bootstrap_correlations([1, 2, 3], [1, 2, 3], seed=0, num_resamples=200)
    assert small["resamples"]["dropped"] > 0 and small["spearman"]["low"] == 1.0


def test_t_quantile_closed_forms_and_scipy():
    # df = 1 is Cauchy: tan(pi (p - 1/2)); df = 2: (2p - 1) sqrt(2 / (4 p (1 - p)))
    for p in (0.9, 0.975, 0.995):
        assert P.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
        assert P.t_quantile(p, 2) == pytest.approx(
            (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-6
        )
    assert P.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)
    assert P.t_quantile(0.025, 4) == pytest.approx(-P.t_quantile(0.975, 4))
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 4, 9, 29):
        assert P.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
    with pytest.raises(ValueError, match="p:"):
        P.t_quantile(1.0, 3)


def test_paired_difference_t_interval_and_coverage():
    d = P.paired_difference([1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0])
    half = 3.182446 * np.std([1, 2, 4, 5], ddof=1) / 2  # t_{0.975, 3} = 3.182446
    assert d["mean"] == 3.0 and d["high"] - d["mean"] == pytest.approx(half, rel=1e-5)
    # coverage of the true mean over repeated draws of 5 pairs: about 95%
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(400):
        a = rng.normal(1.0, 1.0, 5)
        r = P.paired_difference(a, np.zeros(5))
        hits += r["low"] <= 1.0 <= r["high"]
    assert abs(hits / 400 - 0.95) <= 4 * math.sqrt(0.95 * 0.05 / 400)
    with pytest.raises(ValueError, match="same length"):
        P.paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2"):
        P.paired_difference([1], [1])


def test_next_value_geometric_linear_and_bounds():
    assert P.next_value((0.25, 1.0, 4.0, 16.0), "high") == 64.0
    assert P.next_value((1e-4, 1e-3, 1e-2, 1e-1), "low") == pytest.approx(1e-5)
    assert P.next_value((0.1, 0.3, 0.5, 0.7), "high") == pytest.approx(0.9)
    assert P.next_value((0.1, 0.3, 0.5, 0.7), "high", (0.0, 0.85)) == 0.85
    assert P.next_value((0.1, 0.3, 0.5, 0.7), "low", (0.0, 0.85)) == 0.0
    assert P.next_value((0.3, 0.5, 0.7, 1.0), "high", (0.1, 1.0)) is None  # at its bound


def test_a_fixed_hyperparameter_is_not_widened():
    """A one-value grid (a choice fixed by --grids) has no spacing: no widening, one run."""
    assert P.next_value((0.5,), "low") is None and P.next_value((0.5,), "high") is None
    calls = []

    def run(hp, seed):
        calls.append(dict(hp))
        return {"val_accuracy": hp["q"] + hp["radius"]}

    grid = {"q": (0.1,), "radius": (0.25, 1.0)}
    chosen, trials = P.coordinate_search(run, grid, seed=0, start={}, widen=2)
    assert chosen["q"] == 0.1 and all(c["q"] == 0.1 for c in calls)
    assert chosen["radius"] == 16.0  # the two-value coordinate is still widened: 4, 16


def test_widening_moves_the_optimum_inside_or_to_the_bound():
    def run(hp, seed):  # peak at radius 0.01, far below the grid
        return {"val_accuracy": -abs(math.log(hp["radius"] / 0.01))}

    grid = {"radius": (0.25, 1.0, 4.0, 16.0)}
    chosen, trials = P.coordinate_search(run, grid, seed=0, start={}, widen=0)
    assert chosen == {"radius": 0.25}
    chosen, trials = P.coordinate_search(run, grid, seed=0, start={}, widen=5)
    # 0.25 -> 0.0625 -> 0.015625 -> 0.00390625 (worse than 0.0156: stop, inside)
    assert chosen["radius"] == pytest.approx(0.015625)
    tried = P.tried_grid(trials)["radius"]
    assert len(tried) == 7 and P.grid_edges(chosen, {"radius": tried}) == {"radius": "inside"}
    chosen, _ = P.coordinate_search(run, grid, seed=0, start={}, widen=1)
    assert chosen["radius"] == 0.0625  # one step was not enough: still at the (new) edge
    out = P.tune_then_seeds(
        lambda hp, s: run(hp, s), ["constraint"], tune_seed=0, seeds=[1, 2],
        grids={"constraint": grid}, widen=5,
    )  # fmt: skip
    assert out["constraint"]["edges"] == {"radius": "inside"}
    assert len(out["constraint"]["grid"]["radius"]) == 7
