"""The reference code's evaluation protocol, and the statistics its tables need.

Protocol (Ju, Li & Zhang 2022, reference code; ``PAPER.md`` section 3): EVERY method, plain
fine-tuning included, is trained by the same loop with the same optimizer and schedule, is
evaluated on the CLEAN validation set after each epoch, keeps its best-validation checkpoint
and stops after ``patience`` epochs without improvement; the reported test accuracy is that
checkpoint's. Each method's own hyperparameters are chosen on clean validation accuracy on one
tuning seed from a grid (:data:`GRIDS`), then the chosen values are run on fresh seeds.

* :data:`GRIDS`: every method's hyperparameter grid, as data (>= 4 values each).
* :func:`coordinate_search` / :func:`tune_then_seeds`: the driver (no I/O: the caller's
  ``run_fn`` fine-tunes one configuration).
* :func:`correlations`, :func:`bootstrap_correlations`: Pearson, Spearman and Kendall (tau-b)
  with percentile-bootstrap intervals; :func:`paired_difference`: the mean paired difference
  with its Student-t interval; :func:`t_quantile`.

Numpy only (scipy is not a dependency; the tests compare with it when it is installed).

Example:
  >>> r = correlations([1, 2, 3, 4], [1, 3, 2, 4])
  >>> round(r["spearman"], 2), round(r["kendall"], 3)
  (0.8, 0.667)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BOUNDS",
    "GRIDS",
    "HEAD_RADII",
    "RADII",
    "RATES",
    "bootstrap_correlations",
    "coordinate_search",
    "correlations",
    "grid_edges",
    "next_value",
    "paired_difference",
    "t_quantile",
    "tried_grid",
    "tune_then_seeds",
]

# Body radius D (Frobenius, first stage; later stages D * s^depth): a log grid over two
# decades around the reference code's tuned ResNet-18 radii (about 8-11).
RADII = (0.25, 1.0, 4.0, 16.0)
# Head radius around the head's zero initial value (reference ResNet-18: about 6-20).
HEAD_RADII = (1.0, 4.0, 16.0, 64.0)
# rho of the assumed symmetric T (backward/forward correction): not the true rates 0.2-0.8.
RATES = (0.1, 0.3, 0.5, 0.7)

# Each method's hyperparameters, searched in this order (one coordinate at a time, starting
# from each grid's first-listed default in ``start``); RunConfig field names.
GRIDS: dict[str, dict[str, tuple]] = {
    "plain": {},
    "l2sp": {"penalty": (1e-4, 1e-3, 1e-2, 1e-1)},
    "label_smoothing": {"smoothing": (0.05, 0.1, 0.2, 0.4)},
    "gce": {"gce_q": (0.3, 0.5, 0.7, 0.9)},
    "sce": {"sce_alpha": (0.01, 0.1, 0.5, 1.0), "sce_beta": (0.1, 0.5, 1.0, 2.0)},
    "forward": {"assumed_rate": RATES},
    "backward": {"assumed_rate": RATES},
    "constraint": {"radius": RADII, "head_radius": HEAD_RADII},
    "robust": {"radius": RADII, "head_radius": HEAD_RADII, "assumed_rate": RATES},
    "robust_dualt": {"radius": RADII, "head_radius": HEAD_RADII},
    # hessjax's compositions of the constraint with other losses (not the paper's algorithm)
    "robust_clipped": {"radius": RADII, "head_radius": HEAD_RADII, "assumed_rate": RATES},
    "robust_forward": {"radius": RADII, "head_radius": HEAD_RADII, "assumed_rate": RATES},
    "robust_gce": {"radius": RADII, "head_radius": HEAD_RADII, "gce_q": (0.3, 0.5, 0.7, 0.9)},
    "robust_sce": {
        "radius": RADII,
        "head_radius": HEAD_RADII,
        "sce_alpha": (0.01, 0.1, 0.5, 1.0),
        "sce_beta": (0.1, 0.5, 1.0, 2.0),
    },
}
# Where the coordinate search starts (the values the other coordinates hold while one is
# searched); a value of the grid.
START: dict[str, Any] = {"penalty": 1e-2, "smoothing": 0.1, "gce_q": 0.7, "sce_alpha": 0.1,
                         "sce_beta": 1.0, "assumed_rate": 0.3, "radius": 4.0,
                         "head_radius": 16.0}  # fmt: skip

# The range a widened grid may reach (inclusive); rho stays below the singular (k-1)/k = 0.9
# of a symmetric T on 10 classes, q of GCE in (0, 1].
BOUNDS: dict[str, tuple[float, float]] = {"radius": (2.0**-8, 1024.0),
                                          "head_radius": (2.0**-6, 4096.0),
                                          "penalty": (1e-7, 10.0), "smoothing": (1e-3, 0.8),
                                          "gce_q": (0.1, 1.0), "sce_alpha": (1e-4, 10.0),
                                          "sce_beta": (1e-3, 16.0),
                                          "assumed_rate": (0.0, 0.85)}  # fmt: skip

RunFn = Callable[[dict, int], Mapping[str, Any]]


def next_value(values: Sequence[float], side: str, bounds: tuple[float, float] | None = None):
    """The grid's next value beyond its ``"low"`` or ``"high"`` end, or None if out of bounds.

    A positive grid whose consecutive ratios are equal extends geometrically (the edge times
    or divided by the ratio of its two end values), any other grid linearly (the edge plus or
    minus the spacing of its two end values); the result is clipped to ``bounds`` and None
    when clipping leaves it at the edge. A grid of one value has no spacing to extend by:
    None (a fixed hyperparameter is never widened).

    Example:
      >>> next_value((0.25, 1.0, 4.0, 16.0), "low")
      0.0625
      >>> next_value((0.3, 0.5, 0.7, 0.9), "high", (0.1, 1.0))
      1.0
    """
    v = sorted(float(x) for x in values)
    if len(v) < 2:
        return None
    a, b = (v[0], v[1]) if side == "low" else (v[-1], v[-2])
    ratios = [y / x for x, y in zip(v, v[1:], strict=False)] if v[0] > 0 else []
    geometric = bool(ratios) and np.allclose(ratios, ratios[0], rtol=1e-6)
    new = a * (a / b) if geometric else a + (a - b)
    if bounds is not None:
        new = min(max(new, bounds[0]), bounds[1])
    return None if np.isclose(new, a) or new in v else float(new)


def _score(res: Mapping[str, Any]) -> float:
    v = res.get("val_accuracy", float("nan"))
    return float(v) if v is not None else float("nan")


def coordinate_search(
    run_fn: RunFn,
    grid: Mapping[str, Sequence],
    *,
    seed: int,
    start: Mapping[str, Any] | None = None,
    widen: int = 0,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    passes: int = 1,
) -> tuple[dict, list[dict]]:
    """Choose hyperparameters on clean validation accuracy, one coordinate at a time.

    For each hyperparameter in ``grid``'s order, every value is run (the others held at their
    current choice) and the value with the highest ``run_fn(...)["val_accuracy"]`` is kept
    (ties: the earlier grid value). A configuration already run is not run again (``run_fn``
    is called once per distinct configuration). With one hyperparameter this is the full grid
    search; with ``p`` of sizes ``g_1..g_p`` it costs at most ``sum g_j`` runs instead of
    ``prod g_j``. Runs that fail (no finite ``val_accuracy``: an ``"error"``) are never chosen.
    With ``widen > 0``, a choice at an end of its grid extends the grid beyond that end
    (:func:`next_value`, within ``bounds``) while the new value is strictly better, at most
    ``widen`` times per hyperparameter: the optimum is then inside the grid, or the grid hit
    its bound, or ``widen`` steps were not enough (``grid_edges`` of the tried values says so).
    With ``passes > 1`` the sweep over the hyperparameters repeats (cyclic coordinate search,
    each grid as widened so far, ``widen`` more extensions per pass) until a sweep changes
    nothing or ``passes`` sweeps ran: one sweep is blind to interactions (a radius chosen at a
    starting rho is not revisited at the rho chosen after it), and a later sweep reruns only
    the configurations not yet run.

    Args:
      run_fn: ``run_fn(hparams, seed) -> results`` with ``"val_accuracy"`` (the best
        clean-validation accuracy of the run).
      grid: ``name -> values``.
      seed: the tuning seed.
      start: the starting value of each hyperparameter (default :data:`START`, else the
        grid's first value).
      widen: extensions of a grid beyond an end its choice sits at (keyword-only).
      bounds: ``name -> (low, high)`` for the extensions (default :data:`BOUNDS`).
      passes: the most sweeps over the hyperparameters (keyword-only, ``>= 1``).

    Returns:
      ``(chosen, trials)``: the chosen ``{name: value}`` and every distinct run as
      ``{"hparams", "val_accuracy"}`` in the order run.

    Example:
      >>> f = lambda h, seed: {"val_accuracy": -abs(h["a"] - 2) - abs(h["b"] - 1)}
      >>> coordinate_search(f, {"a": [1, 2, 3], "b": [0, 1]}, seed=0, start={"a": 1, "b": 0})[0]
      {'a': 2, 'b': 1}
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes: expected an int >= 1, got {passes!r}")
    start = dict(START if start is None else start)
    current = {k: (start[k] if k in start and start[k] in v else v[0]) for k, v in grid.items()}
    trials: list[dict] = []
    seen: dict[tuple, float] = {}

    def run(hp: dict) -> float:
        key = tuple(sorted(hp.items()))
        if key not in seen:
            res = run_fn(dict(hp), seed)
            seen[key] = _score(res)
            trials.append(dict(hparams=dict(hp), val_accuracy=seen[key],
                               **({"error": res["error"]} if "error" in res else {})))  # fmt: skip
        return seen[key]

    if not grid:
        run({})
        return {}, trials
    bounds = BOUNDS if bounds is None else bounds
    grids = {name: list(values) for name, values in grid.items()}  # widened as searched
    for _ in range(passes):
        before = dict(current)
        for name in grid:
            values = grids[name]
            scores = [run(current | {name: v}) for v in values]
            finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
            if not finite:
                continue
            best = max(finite, key=lambda i: (scores[i], -i))
            current[name] = values[best]
            for _ in range(widen):
                side = {0: "low", len(values) - 1: "high"}.get(values.index(current[name]))
                new = next_value(values, side, bounds.get(name)) if side else None
                if new is None:
                    break
                values = [new, *values] if side == "low" else [*values, new]
                grids[name] = values
                score = run(current | {name: new})
                if not (math.isfinite(score) and score > scores[best]):
                    break
                current[name], scores[best] = new, score
        if current == before:
            break
    return current, trials


def tried_grid(trials: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """``name -> sorted values`` tried in ``trials`` (the grid after any widening)."""
    out: dict[str, set] = {}
    for t in trials:
        for k, v in t["hparams"].items():
            out.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in out.items()}


def grid_edges(chosen: Mapping[str, Any], grid: Mapping[str, Sequence]) -> dict[str, str]:
    """Where each chosen value sits in its grid: ``"low"``/``"high"`` edge or ``"inside"``.

    An optimum at an edge means the grid should be widened on that side.

    Example:
      >>> grid_edges({"radius": 16.0}, {"radius": (0.25, 1.0, 4.0, 16.0)})
      {'radius': 'high'}
    """
    out = {}
    for k, v in chosen.items():
        vals = sorted(grid[k])
        i = vals.index(v)
        out[k] = "low" if i == 0 else "high" if i == len(vals) - 1 else "inside"
    return out


def tune_then_seeds(
    run_fn: RunFn,
    methods: Sequence[str],
    *,
    tune_seed: int,
    seeds: Sequence[int],
    grids: Mapping[str, Mapping[str, Sequence]] | None = None,
    start: Mapping[str, Any] | None = None,
    widen: int = 0,
    passes: int = 1,
) -> dict[str, dict]:
    """For each method: tune on ``tune_seed`` (:func:`coordinate_search`), then run ``seeds``.

    ``run_fn(hparams, seed)`` is called with ``hparams | {"method": name}`` and must train
    with the protocol (early stopping on clean validation, best checkpoint); results carrying
    ``"missing"`` or ``"error"`` are kept as they are, for the caller to report.

    Args:
      run_fn: ``run_fn(hparams, seed) -> results``.
      methods: names in ``grids``.
      tune_seed: the seed the grid is searched on (not among the reported ``seeds``).
      seeds: the fresh seeds of the reported numbers.
      grids: ``method -> {name: values}`` (default :data:`GRIDS`).
      start, widen, passes: passed to :func:`coordinate_search`.

    Returns:
      ``method -> {"chosen", "trials", "grid", "edges", "runs": {seed: results}}`` (``grid``:
      the values tried, after any widening; ``edges``: where the choice sits in it).

    Raises:
      ValueError: a method without a grid; ``tune_seed`` among ``seeds``.

    Example:
      >>> f = lambda h, seed: {"val_accuracy": h.get("gce_q", 0.5), "test_accuracy": 0.5}
      >>> out = tune_then_seeds(f, ["gce"], tune_seed=0, seeds=[1, 2])
      >>> out["gce"]["chosen"], sorted(out["gce"]["runs"])
      ({'gce_q': 0.9}, [1, 2])
    """
    grids = GRIDS if grids is None else grids
    unknown = [m for m in methods if m not in grids]
    if unknown:
        raise ValueError(f"methods: no grid for {unknown} (grids for {sorted(grids)})")
    if tune_seed in seeds:
        raise ValueError(f"tune_seed: {tune_seed} is also in seeds {list(seeds)}: use fresh seeds")
    out = {}
    for m in methods:
        fn = lambda hp, s, m=m: run_fn(dict(hp, method=m), s)
        chosen, trials = coordinate_search(fn, grids[m], seed=tune_seed, start=start,
                                           widen=widen, passes=passes)  # fmt: skip
        runs = {s: dict(fn(chosen, s)) for s in seeds}
        grid = tried_grid(trials)
        out[m] = dict(chosen=chosen, trials=trials, grid=grid, edges=grid_edges(chosen, grid),
                      runs=runs)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), float)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else float("nan")


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - n1)(n0 - n2))."""
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    sx, sy = sx[iu], sy[iu]
    den = math.sqrt(float(np.sum(sx != 0)) * float(np.sum(sy != 0)))
    return float(np.sum(sx * sy)) / den if den > 0 else float("nan")


def _check_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x, y: expected the same length, got {x.shape[0]} and {y.shape[0]}")
    if len(x) < 3:
        raise ValueError(f"x: expected at least 3 pairs, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x, y: expected finite values (a NaN or inf was given)")
    return x, y


def correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson's r, Spearman's rho (Pearson of average ranks) and Kendall's tau-b.

    Cost: O(n^2) memory and time (Kendall's pairs). A constant ``x`` or ``y`` gives NaN.

    Raises:
      ValueError: different lengths, fewer than 3 pairs, a non-finite value.

    Example:
      >>> correlations([1, 2, 3], [2, 4, 7])["spearman"]
      1.0
    """
    x, y = _check_pairs(x, y)
    return dict(pearson=_pearson(x, y), spearman=_pearson(_ranks(x), _ranks(y)),
                kendall=_kendall(x, y))  # fmt: skip


def bootstrap_correlations(
    x: Sequence[float],
    y: Sequence[float],
    *,
    seed: int,
    num_resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """The three correlations with percentile-bootstrap intervals over resampled pairs.

    Pairs ``(x_i, y_i)`` are drawn with replacement ``num_resamples`` times; a resample in
    which ``x`` or ``y`` is constant (undefined correlation) is dropped and counted.

    Args:
      x, y: the paired values (e.g. measure and gap of each model).
      seed: the resampling seed (numpy ``default_rng``).
      num_resamples: bootstrap resamples (keyword-only, static).
      level: the interval's coverage.

    Returns:
      ``name -> {"estimate", "low", "high"}`` for pearson/spearman/kendall, and
      ``"resamples": {"used", "dropped"}``.

    Raises:
      ValueError: bad pairs (see :func:`correlations`), ``level`` outside (0, 1).

    Example:
      >>> b = bootstrap_correlations(range(10), range(10), seed=0, num_resamples=100)
      >>> b["spearman"]["low"], b["spearman"]["high"]
      (1.0, 1.0)
    """
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    x, y = _check_pairs(x, y)
    est = correlations(x, y)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in est}
    dropped = 0
    for _ in range(num_resamples):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) == 0 or np.ptp(y[i]) == 0:
            dropped += 1
            continue
        for k, v in correlations(x[i], y[i]).items():
            draws[k].append(v)
    a = (1 - level) / 2
    out: dict[str, Any] = {}
    for k, v in est.items():
        d = np.asarray(draws[k])
        lo, hi = np.quantile(d, [a, 1 - a]) if d.size else (np.nan, np.nan)
        out[k] = dict(estimate=v, low=float(lo), high=float(hi))
    out["resamples"] = dict(used=num_resamples - dropped, dropped=dropped)
    return out


def _t_cdf(t: float, df: float) -> float:
    """Student-t CDF by Simpson's rule on the density over [0, |t|] (t mapped to atan)."""
    if t == 0:
        return 0.5
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    # substitute t = tan(u): integrand f(tan u) / cos^2 u is smooth on [0, atan|t|]
    b, n = math.atan(abs(t)), 2000
    u = np.linspace(0.0, b, n + 1)
    f = c * (1 + np.tan(u) ** 2 / df) ** (-(df + 1) / 2) / np.cos(u) ** 2
    area = (b / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(float(area), t)


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (bisection).

    Raises:
      ValueError: ``p`` outside (0, 1) or ``df`` <= 0.

    Example:
      >>> round(t_quantile(0.975, 4), 3)
      2.776
    """
    if not 0 < p < 1:
        raise ValueError(f"p: expected a number in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df: expected a number > 0, got {df}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict:
    """Mean of ``a_i - b_i`` (paired, e.g. by seed) with its Student-t interval.

    ``mean +- t_{(1+level)/2, n-1} * std(d, ddof=1) / sqrt(n)``.

    Returns:
      ``{"mean", "std", "low", "high", "n"}``.

    Raises:
      ValueError: different lengths, fewer than 2 pairs, ``level`` outside (0, 1).

    Example:
      >>> d = paired_difference([3, 4, 5], [1, 2, 3])
      >>> d["mean"], d["low"], d["high"]
      (2.0, 2.0, 2.0)
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected the same length, got {a.shape[0]} and {b.shape[0]}")
    if len(a) < 2:
        raise ValueError(f"a: expected at least 2 pairs, got {len(a)}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    d = a - b
    n, mean, std = len(d), float(d.mean()), float(d.std(ddof=1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return dict(mean=mean, std=std, low=mean - half, high=mean + half, n=n)
