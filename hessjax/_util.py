"""Small helpers shared across hessjax's modules (private: not part of the public API)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known, ``None`` when it is traced.

    Example:
      >>> concrete(1.5).item()
      1.5
    """
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def listing(title: str, items: list[str], limit: int = 25) -> str:
    """``"title (n): a, b, ... and k more"`` for error messages that list names.

    Example:
      >>> listing("missing", ["a", "b", "c"], limit=2)
      'missing (3): a, b ... and 1 more'
    """
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"
