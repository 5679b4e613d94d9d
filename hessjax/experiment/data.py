"""The data of a run: its splits (noisy training labels), the true noise T, frozen-trunk
features, and the model; memoised in a :class:`RunCache` (with the per-model losses)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hessjax.experiment.config import NOISE_TYPES

__all__ = ["RunCache", "first_block", "make_run_model", "noise_transition"]

# The options that decide a run's splits (its cache key).
SPLIT_KEYS = ("dataset", "seed", "val_size", "n_per_class", "test_size", "image_size", "model",
              "noise_type", "noise_rate", "data_dir")  # fmt: skip


class RunCache:
    """Bounded memo of loaded splits, frozen-trunk features and per-model losses.

    Experiments fine-tune many models on the same data: the splits of one set of
    :data:`SPLIT_KEYS` are loaded once, the frozen blocks' outputs (``train_from``) are
    computed once per image array, and one loss object per model structure
    (:meth:`state_loss`) lets jitted measures compile once for all runs of that model.

    Args:
      max_splits: splits kept.
      max_trunks: trunk feature arrays kept.
    """

    def __init__(self, max_splits: int = 8, max_trunks: int = 32):
        self._splits: dict[str, Any] = {}
        self._trunks: dict[tuple[int, str], np.ndarray] = {}
        self._losses: dict[Any, Callable] = {}
        self.max_splits, self.max_trunks = max_splits, max_trunks

    @staticmethod
    def _memo(cache: dict, key, limit: int, compute: Callable[[], Any]):
        if key not in cache:
            if len(cache) >= limit:
                cache.pop(next(iter(cache)))
            cache[key] = compute()
        return cache[key]

    def splits(self, cfg: Mapping[str, Any]):
        """``(splits, true T)`` of a run: raw images, noisy training labels."""
        key = json.dumps([cfg[k] for k in SPLIT_KEYS], default=str)
        return self._memo(self._splits, key, self.max_splits, lambda: _load_splits(cfg))

    def trunk(self, images: np.ndarray, first: int) -> np.ndarray:
        """``mobilenet_v2_trunk(images, first)``, memoised on the images' bytes."""
        from hessjax.models import mobilenet_v2_trunk

        key = (first, hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest())
        return self._memo(self._trunks, key, self.max_trunks,
                          lambda: mobilenet_v2_trunk(images, first))  # fmt: skip

    def with_trunk(self, splits, first: int):
        """The splits with every image replaced by the frozen trunk's output (``train_from``)."""
        if not first:
            return splits
        parts = (splits.train_images, splits.val_images, splits.test_images)
        feats = self.trunk(np.concatenate(parts), first)  # one pass, one compiled shape
        ends = np.cumsum([len(p) for p in parts])
        train, val, test = np.split(feats, ends[:-1])
        return splits._replace(train_images=train, val_images=val, test_images=test)

    def state_loss(self, geval, params_state, rest_state):
        """``f({"params": p, "rest": r}, (x, y))``: one example's cross-entropy, eval mode."""
        import jax
        from flax import nnx

        from hessjax.train import cross_entropy

        if geval not in self._losses:
            # Only the structure of these templates is used: every value is replaced below.
            ps_template, rs_template = params_state, rest_state

            def state_loss(state, ex):
                ps = jax.tree.map(lambda a: a, ps_template)
                rs = jax.tree.map(lambda a: a, rs_template)
                nnx.replace_by_pure_dict(ps, state["params"])
                nnx.replace_by_pure_dict(rs, state["rest"])
                logits = nnx.merge(geval, ps, rs)(ex[0][None])
                return cross_entropy(logits, ex[1][None])[0]

            self._losses[geval] = state_loss
        return self._losses[geval]


def noise_transition(kind: str, rate: float, k: int) -> np.ndarray | None:
    """The true transition matrix of the training-label noise (None at rate 0)."""
    from hessjax.noise import (
        pair_flip_transition,
        symmetric_transition,
        uniform_replacement_transition,
    )

    if kind not in NOISE_TYPES:
        raise ValueError(f"noise_type: expected one of {NOISE_TYPES}, got {kind!r}")
    if rate == 0:
        return None
    fn = {"symmetric": symmetric_transition, "uniform": uniform_replacement_transition,
          "pair": pair_flip_transition}[kind]  # fmt: skip
    return np.asarray(fn(rate, num_classes=k))


def first_block(cfg: Mapping[str, Any]) -> int:
    """The first fine-tuned MobileNetV2 block of a run (``train_from``; 0: all)."""
    fb = cfg.get("train_from", 0) or 0
    if fb and cfg["model"] != "mobilenet_v2":
        raise ValueError(
            f"train_from: only mobilenet_v2 can be split, got {fb} with {cfg['model']!r}"
        )
    if not 0 <= fb <= 18:
        raise ValueError(f"train_from: expected a block index in [0, 18], got {fb}")
    return fb


def make_run_model(cfg: Mapping[str, Any], splits):
    """The run's model, freshly initialised (pretrained weights and a new head)."""
    from hessjax.models import make_model

    return make_model(cfg["model"], splits.num_classes, seed=cfg["seed"],
                      in_channels=splits.train_images.shape[-1],
                      first_block=first_block(cfg))  # fmt: skip


def _load_splits(cfg: Mapping[str, Any]):
    from hessjax.data import load_splits

    if not 0 <= cfg["noise_rate"] <= 1:
        raise ValueError(f"noise_rate: expected a number in [0, 1], got {cfg['noise_rate']}")
    splits = load_splits(
        cfg["dataset"],
        seed=cfg["seed"],
        val_size=cfg["val_size"],
        n_per_class=cfg["n_per_class"],
        test_size=cfg["test_size"],
        image_size=cfg["image_size"],
        imagenet=cfg["model"] == "mobilenet_v2",
        transition=lambda k: noise_transition(cfg["noise_type"], cfg["noise_rate"], k),
        data_dir=cfg["data_dir"],
    )
    return splits, noise_transition(cfg["noise_type"], cfg["noise_rate"], splits.num_classes)
