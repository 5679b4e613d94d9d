"""A per-layer table of the Hessian distance measure that prints and serialises to JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from hessjax.measures.companions import LayerTraces
from hessjax.measures.distance import HessianDistance


@dataclasses.dataclass(frozen=True)
class Report:
    """A per-layer table of the Hessian distance measure (prints as text, serialises to JSON).

    Columns: layer, ``||v_i||_F``, ``calH_i``, ``max Tr H_i^+`` (when traces were given), and
    the layer's share of the measure ``sqrt(calH_i / n) / measure``.
    """

    rows: tuple[dict[str, Any], ...]
    measure: float
    n: float
    variant: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable)."""
        return {
            "variant": self.variant,
            "n": self.n,
            "measure": self.measure,
            "layers": [dict(r) for r in self.rows],
        }

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`; keyword arguments go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        has_trace = any("max_trace" in r for r in self.rows)
        width = max([5] + [len(r["layer"]) for r in self.rows])
        head = f"{'layer':<{width}}  {'||v_i||':>10}  {'calH_i':>11}"
        head += f"  {'max Tr H+':>11}" if has_trace else ""
        head += f"  {'share':>6}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{r['layer']:<{width}}  {r['distance']:>10.4g}  {r['calH']:>11.4g}"
            if has_trace:
                line += f"  {r.get('max_trace', float('nan')):>11.4g}"
            line += f"  {100 * r['share']:>5.1f}%"
            lines.append(line)
        lines.append("-" * len(head))
        lines.append(f"measure = sum_i sqrt(calH_i / n) = {self.measure:.6g}  (n = {self.n:g})")
        return "\n".join(lines)


def report(result: HessianDistance, traces: LayerTraces | None = None) -> Report:
    """Builds the per-layer :class:`Report` of a :func:`hessian_distance` result.

    Args:
      result: the measure.
      traces: optional :func:`layer_traces` of the same layers (adds ``max Tr H_i^+``).

    Returns:
      A :class:`Report`; ``print(report(r))`` shows the table, ``report(r).to_json()`` the
      JSON.

    Raises:
      ValueError: ``traces`` for other layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.measures import hessian_distance
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)
      >>> r = hessian_distance(loss, {"w": jnp.ones((1, 2))}, {"w": jnp.zeros((1, 2))},
      ...                      jnp.eye(2), n=1)
      >>> round(report(r).to_dict()["layers"][0]["calH"], 5)
      1.0

    References:
      Ju, Li & Zhang, ICML 2022.
    """
    if traces is not None and tuple(traces.names) != tuple(result.names):
        raise ValueError(
            f"traces are for layers {traces.names}, the result for {result.names}: they must match"
        )
    contrib = np.asarray(result.contributions, dtype=np.float64)
    total = float(contrib.sum())
    rows = []
    for i, name in enumerate(result.names):
        row = {
            "layer": name,
            "distance": float(result.distances[i]),
            "calH": float(result.per_layer[i]),
            "argmax": int(result.argmax[i]),
            "contribution": float(contrib[i]),
            "share": float(contrib[i] / total) if total > 0 else 0.0,
        }
        if traces is not None:
            row["max_trace"] = float(traces.max[i])
            row["mean_trace"] = float(traces.mean[i])
        rows.append(row)
    return Report(rows=tuple(rows), measure=total, n=float(result.n), variant=result.variant)
