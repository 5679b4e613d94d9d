"""Small models and losses shared by the tests, with dense references.

Every factory returns ``(loss_fn, params, batch)`` with ``loss_fn(params, batch)`` a real scalar
(mean cross-entropy over a batch of 8 examples, 3 classes) and at most ~150 parameters, so a
dense ``jax.hessian`` is cheap. Factories are keyword-only::

    loss_fn, params, batch = dict_mlp(dtype=jnp.float64, activation="relu")

==============  ==================================================================  ========
name            model                                                               params
==============  ==================================================================  ========
``dict_mlp``    plain dict, 3 -> 5 -> 5 -> 3                                             68
``dict_cnn``    plain dict, 6x6x2 -> conv3x3(3) -> conv3x3(2) -> dense(3)               140
``nnx_mlp``     ``flax.nnx`` Linear layers, 3 -> 5 -> 5 -> 3                            68
``nnx_cnn``     ``flax.nnx`` conv -> BatchNorm (eval mode) -> conv -> dense             146
==============  ==================================================================  ========

For the nnx models ``params`` is the ``nnx.Param`` state of ``nnx.split(model, nnx.Param, ...)``;
``loss_fn`` merges it with the graph definition and the remaining (BatchNorm running statistics)
state, which it closes over. The running statistics are set to non-trivial values, and the
BatchNorm scale and all biases are random, so every leaf has a non-zero Hessian block.

``FACTORIES`` maps the names above to the factories. :func:`example_problem` gives the
per-example form ``(example_loss, params, examples)``: ``example_loss(params, example)`` is the
loss of ONE example (leaves of ``examples`` without their leading axis) and
``loss_fn(params, batch) == mean_b example_loss(params, examples[b])``.

Dense references (independent of hessjax): :func:`dense_hessian`, :func:`ravel`,
:func:`unravel`, :func:`block_mask`.

float64: call the factory inside ``with jax.enable_x64(True):`` (and use the results there);
the factories raise if 64-bit types are not enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

PyTree = Any
Problem = tuple[Callable[..., jax.Array], PyTree, PyTree]

NUM_EXAMPLES = 8
NUM_CLASSES = 3
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"tanh": jnp.tanh, "relu": jax.nn.relu}


# --------------------------------------------------------------------------- helpers
def _check_args(dtype: Any, activation: str) -> tuple[np.dtype, Callable[[jax.Array], jax.Array]]:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if jnp.zeros((), dtype).dtype != dtype:
        raise ValueError(f"dtype {dtype} needs `with jax.enable_x64(True):` around the call")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return dtype, ACTIVATIONS[activation]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer labels (logits ``(n, k)``, labels ``(n,)``)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _data(rng: np.random.Generator, x_shape: tuple[int, ...], dtype: np.dtype) -> PyTree:
    x = rng.normal(size=(NUM_EXAMPLES, *x_shape))
    y = rng.integers(0, NUM_CLASSES, size=NUM_EXAMPLES)
    return {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, jnp.int32)}


def _problem(logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, batch: PyTree):
    """Batch loss and per-example loss from ``logits_fn(params, x_batch)``."""

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        return _cross_entropy(logits_fn(params, batch["x"]), batch["y"])

    def example_loss(params: PyTree, example: PyTree) -> jax.Array:
        return _cross_entropy(logits_fn(params, example["x"][None]), example["y"][None])

    return loss_fn, example_loss, params, batch


def _dense(rng: np.random.Generator, n_in: int, n_out: int, dtype: np.dtype) -> dict:
    return {
        "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), dtype),
        "bias": jnp.asarray(0.3 * rng.normal(size=(n_out,)), dtype),
    }


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    out = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out + bias


# --------------------------------------------------------------------------- builders
def _build_dict_mlp(dtype, activation, seed):
    dtype, act = _check_args(dtype, activation)
    rng = np.random.default_rng(seed)
    params = {
        "hidden1": _dense(rng, 3, 5, dtype),
        "hidden2": _dense(rng, 5, 5, dtype),
        "out": _dense(rng, 5, NUM_CLASSES, dtype),
    }

    def logits_fn(p, x):
        h = act(x @ p["hidden1"]["kernel"] + p["hidden1"]["bias"])
        h = act(h @ p["hidden2"]["kernel"] + p["hidden2"]["bias"])
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    return _problem(logits_fn, params, _data(rng, (3,), dtype))


def _build_dict_cnn(dtype, activation, seed):
    dtype, act = _check_args(dtype, activation)
    rng = np.random.default_rng(seed)

    def conv_params(c_in, c_out):
        return {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) / np.sqrt(9 * c_in), dtype),
            "bias": jnp.asarray(0.3 * rng.normal(size=(c_out,)), dtype),
        }

    params = {
        "conv1": conv_params(2, 3),
        "conv2": conv_params(3, 2),
        "out": _dense(rng, 2 * 2 * 2, NUM_CLASSES, dtype),
    }

    def logits_fn(p, x):
        h = act(_conv(x, p["conv1"]["kernel"], p["conv1"]["bias"]))
        h = act(_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"]))
        h = h.reshape(h.shape[0], -1)
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    return _problem(logits_fn, params, _data(rng, (6, 6, 2), dtype))


class _NnxMLP(nnx.Module):
    def __init__(self, act, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.act = act
        self.hidden1 = nnx.Linear(3, 5, **kw)
        self.hidden2 = nnx.Linear(5, 5, **kw)
        self.out = nnx.Linear(5, NUM_CLASSES, **kw)

    def __call__(self, x):
        x = self.act(self.hidden1(x))
        x = self.act(self.hidden2(x))
        return self.out(x)


class _NnxCNN(nnx.Module):
    def __init__(self, act, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.act = act
        self.conv1 = nnx.Conv(2, 3, (3, 3), padding="VALID", **kw)
        self.bn = nnx.BatchNorm(3, use_running_average=True, **kw)
        self.conv2 = nnx.Conv(3, 2, (3, 3), padding="VALID", **kw)
        self.out = nnx.Linear(2 * 2 * 2, NUM_CLASSES, **kw)

    def __call__(self, x):
        x = self.act(self.bn(self.conv1(x)))
        x = self.act(self.conv2(x))
        return self.out(x.reshape(x.shape[0], -1))


def _randomise(model: nnx.Module, rng: np.random.Generator) -> None:
    """Random kernels and biases, BatchNorm scale and non-trivial running statistics (in place;
    drawn with numpy, so the values do not depend on the dtype)."""
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        name = path[-1]
        shape, dtype = var.value.shape, var.value.dtype
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            var.value = jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), dtype)
        elif name == "bias":
            var.value = jnp.asarray(0.3 * rng.normal(size=shape), dtype)
        elif name == "scale":
            var.value = jnp.asarray(1.0 + 0.3 * rng.normal(size=shape), dtype)
        elif name == "mean":
            var.value = jnp.asarray(0.5 * rng.normal(size=shape), dtype)
        elif name == "var":
            var.value = jnp.asarray(rng.uniform(0.3, 2.0, size=shape), dtype)


def _build_nnx(cls, x_shape, dtype, activation, seed):
    dtype, act = _check_args(dtype, activation)
    rng = np.random.default_rng(seed)
    model = cls(act, dtype, nnx.Rngs(seed))
    _randomise(model, rng)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return _problem(logits_fn, params, _data(rng, x_shape, dtype))


_BUILDERS = {
    "dict_mlp": _build_dict_mlp,
    "dict_cnn": _build_dict_cnn,
    "nnx_mlp": lambda dtype, act, seed: _build_nnx(_NnxMLP, (3,), dtype, act, seed),
    "nnx_cnn": lambda dtype, act, seed: _build_nnx(_NnxCNN, (6, 6, 2), dtype, act, seed),
}


# --------------------------------------------------------------------------- public API
def dict_mlp(*, dtype: Any = jnp.float32, activation: str = "tanh", seed: int = 0) -> Problem:
    """Plain-dict MLP 3 -> 5 -> 5 -> 3 (68 params); returns ``(loss_fn, params, batch)``."""
    loss_fn, _, params, batch = _build_dict_mlp(dtype, activation, seed)
    return loss_fn, params, batch


def dict_cnn(*, dtype: Any = jnp.float32, activation: str = "tanh", seed: int = 0) -> Problem:
    """Plain-dict CNN on 6x6x2 inputs (140 params); returns ``(loss_fn, params, batch)``."""
    loss_fn, _, params, batch = _build_dict_cnn(dtype, activation, seed)
    return loss_fn, params, batch


def nnx_mlp(*, dtype: Any = jnp.float32, activation: str = "tanh", seed: int = 0) -> Problem:
    """``flax.nnx`` MLP 3 -> 5 -> 5 -> 3 (68 params); ``params`` is an ``nnx.State``."""
    loss_fn, _, params, batch = _BUILDERS["nnx_mlp"](dtype, activation, seed)
    return loss_fn, params, batch


def nnx_cnn(*, dtype: Any = jnp.float32, activation: str = "tanh", seed: int = 0) -> Problem:
    """``flax.nnx`` CNN with BatchNorm in eval mode (146 params); ``params`` is an
    ``nnx.State`` of the ``nnx.Param`` leaves; the running statistics are closed over."""
    loss_fn, _, params, batch = _BUILDERS["nnx_cnn"](dtype, activation, seed)
    return loss_fn, params, batch


FACTORIES: dict[str, Callable[..., Problem]] = {
    "dict_mlp": dict_mlp,
    "dict_cnn": dict_cnn,
    "nnx_mlp": nnx_mlp,
    "nnx_cnn": nnx_cnn,
}


def example_problem(
    name: str, *, dtype: Any = jnp.float32, activation: str = "tanh", seed: int = 0
) -> Problem:
    """The per-example form of model ``name``: ``(example_loss, params, examples)``.

    ``example_loss(params, example)`` is the cross-entropy of ONE example, where ``example``
    is ``{"x": x_b, "y": y_b}`` (``examples`` indexed at ``b`` on every leaf); ``examples`` holds
    ``NUM_EXAMPLES`` examples and equals the ``batch`` of the matching factory (same seed), so
    the batch loss is the mean of the per-example losses.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {sorted(_BUILDERS)}, got {name!r}")
    _, example_loss, params, examples = _BUILDERS[name](dtype, activation, seed)
    return example_loss, params, examples


def ravel(tree: PyTree) -> jax.Array:
    """All leaves of ``tree`` concatenated into one vector (``jax.tree_util`` leaf order)."""
    return ravel_pytree(tree)[0]


def unravel(like: PyTree, flat: jax.Array) -> PyTree:
    """Inverse of :func:`ravel`: the vector ``flat`` as a pytree with the structure of ``like``."""
    return ravel_pytree(like)[1](flat)


def dense_hessian(loss_fn: Callable[..., jax.Array], params: PyTree, *args: Any) -> jax.Array:
    """The dense Hessian ``(P, P)`` of ``loss_fn(params, *args)`` w.r.t. :func:`ravel`'d params.

    Uses ``jax.jit(jax.hessian(...))`` on the flat vector, not hessjax.
    """
    flat, unravel_fn = ravel_pytree(params)
    return jax.jit(jax.hessian(lambda f, *a: loss_fn(unravel_fn(f), *a)))(flat, *args)


def layer_ids(partition: Any, params: PyTree) -> np.ndarray:
    """For every scalar of :func:`ravel`'d ``params``, its layer index in ``partition`` (-1:
    none). Reads only ``partition.leaf_layer``."""
    leaves = jax.tree_util.tree_leaves(params)
    if len(leaves) != len(partition.leaf_layer):
        raise ValueError("params does not match the partition")
    return np.concatenate(
        [
            np.full(np.size(x), g, np.int64)
            for x, g in zip(leaves, partition.leaf_layer, strict=True)
        ]
    )


def block_mask(partition: Any, params: PyTree) -> np.ndarray:
    """The dense 0/1 ``(P, P)`` mask of the diagonal blocks of the layers of ``partition``.

    ``mask[a, b] = 1`` iff scalars ``a`` and ``b`` of :func:`ravel`'d ``params`` are in the same
    layer; rows and columns of leaves in no layer are zero. ``(H * mask) v`` is then the
    block-diagonal product that ``hessjax.block_hvp`` computes.
    """
    ids = layer_ids(partition, params)
    return ((ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)).astype(np.float64)
