"""Read (and write) PyTorch ``torch.save`` files with numpy only, through a restricted unpickler.

Two container formats exist:

* legacy (torch < 1.6, still common for torchvision's published weights): five back-to-back
  pickles in one file -- the magic number ``0x1950A86A20F9469CFC6C``, the protocol version
  ``1001``, a ``sys_info`` dict (endianness, type sizes), the object itself (tensors refer to
  their storages through *persistent ids*), the list of storage keys -- followed, for each key
  in that order, by an 8-byte little-endian element count and the storage's raw bytes;
* zip (torch >= 1.6): an archive ``<dir>/data.pkl`` holding the object pickle, one raw file
  ``<dir>/data/<key>`` per storage and an optional ``<dir>/byteorder``.

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks[, metadata])`` and its storage as the persistent id
``('storage', torch.FloatStorage, key, location, numel[, view_metadata])``.

The unpickler resolves only the handful of globals a state dict needs (see
``_ALLOWED_GLOBALS``); any other global -- ``os.system``, ``builtins.eval``, a model class --
raises :class:`UnsafePickleError` naming it, before anything is called. Tensors come back as
numpy arrays (bfloat16 through ``ml_dtypes``).

Reference: ``torch/serialization.py`` (``_legacy_save`` / ``_legacy_load``, ``_save`` /
``_load``) in PyTorch, read for the format only.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of one element.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_TO_STORAGE = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referred to a global outside the allow-list (nothing was executed)."""


class TorchFileError(ValueError, pickle.UnpicklingError):
    """A file that is empty, truncated, corrupt or not a torch.save file (names the file).

    A ValueError, and an UnpicklingError for callers that catch that.
    """


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: carries the dtype, cannot be called."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *rest):
    """A strided numpy view of ``storage`` (filled in place later), bounds-checked."""
    del requires_grad, rest  # backward hooks / metadata carry no data
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError(f"tensor storage must be a storage, got {type(storage)}")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {storage_offset}, {size}")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.shape[0]:
            raise pickle.UnpicklingError(
                f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches past "
                f"its storage of {storage.shape[0]} elements"
            )
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[storage_offset:], shape=size, strides=[s * item for s in stride]
        )
    return np.zeros(size, storage.dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    del requires_grad, backward_hooks, rest
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals of a tensor state dict.

    ``find_class`` returns our own numpy-based stand-ins for ``torch._utils._rebuild_tensor_v2``
    (and ``_rebuild_tensor``, ``_rebuild_parameter``), storage-type markers for
    ``torch.FloatStorage`` and friends, and ``collections.OrderedDict``; anything else raises
    :class:`UnsafePickleError`. Persistent ids are passed to ``storage_loader(pid)`` (a pickle
    without a loader may not use them).

    Args:
        file: binary file positioned at the start of a pickle.
        storage_loader: callable for ``('storage', ...)`` persistent ids, or None.
    """

    def __init__(self, file: BinaryIO, storage_loader=None):
        super().__init__(file, encoding="utf-8")
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle the global {module}.{name}: only tensor state dicts "
                f"(torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict) "
                f"may be loaded"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._storage_loader(pid)


def _parse_storage_pid(pid: Any) -> tuple[np.dtype, str, int, Any]:
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"bad storage size {numel!r}")
    return storage_type.dtype, str(key), numel, (pid[5] if len(pid) == 6 else None)


def _materialise(obj: Any) -> Any:
    """Replace the storage views by independent contiguous arrays, recursively."""
    if isinstance(obj, np.ndarray):
        return np.array(obj, copy=True, order="C")
    if isinstance(obj, Mapping):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _read_legacy(f: BinaryIO) -> Any:
    magic = RestrictedUnpickler(f).load()
    if magic != MAGIC_NUMBER:
        raise ValueError(
            "not a torch.save file: the first pickle is not the legacy magic number "
            "(and the file is not a zip archive)"
        )
    version = RestrictedUnpickler(f).load()
    if version != PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy torch protocol version {version}, expected 1001")
    sys_info = RestrictedUnpickler(f).load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)

    storages: dict[str, np.ndarray] = {}
    budget = [os.fstat(f.fileno()).st_size if hasattr(f, "fileno") else float("inf")]

    def load_storage(pid):
        dtype, key, numel, view = _parse_storage_pid(pid)
        if key not in storages:
            budget[0] -= numel * dtype.itemsize  # no allocation beyond what the file can hold
            if budget[0] < 0:
                raise ValueError(f"storage {key} ({numel} elements) is larger than the file")
            storages[key] = np.zeros(numel, dtype)
        root = storages[key]
        if view is None:
            return root
        _view_key, offset, view_size = view
        if not (0 <= offset and offset + view_size <= root.shape[0]):
            raise pickle.UnpicklingError(f"storage view {view!r} out of bounds")
        return root[offset : offset + view_size]

    result = RestrictedUnpickler(f, load_storage).load()
    keys = RestrictedUnpickler(f).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise pickle.UnpicklingError("storage key list does not match the storages referenced")
    for key in map(str, keys):
        root = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"truncated file: no size record for storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != root.shape[0]:
            raise ValueError(
                f"storage {key}: file holds {count} elements, expected {root.shape[0]}"
            )
        nbytes = count * root.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"truncated file: storage {key} has {len(data)} of {nbytes} bytes")
        dtype = root.dtype if little else root.dtype.newbyteorder(">")
        root[:] = np.frombuffer(data, dtype)
    return _materialise(result)


def _read_zip(f: BinaryIO) -> Any:
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"zip archive is not a torch.save file (no <dir>/data.pkl): {names}")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = archive.read(prefix + "byteorder").strip() != b"big"
        storages: dict[str, np.ndarray] = {}

        def load_storage(pid):
            dtype, key, numel, _ = _parse_storage_pid(pid)
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise ValueError(f"zip archive lacks the storage file {name}")
                nbytes = numel * dtype.itemsize
                info = archive.getinfo(name)
                if info.file_size > nbytes:
                    # the declared tensor size caps what is inflated (no zip bombs)
                    raise ValueError(
                        f"storage {name}: the archive declares {info.file_size} bytes, more "
                        f"than the {nbytes} of its {numel} elements"
                    )
                with archive.open(name) as g:
                    data = g.read(nbytes + 1)
                if len(data) != nbytes:
                    raise ValueError(f"storage {name}: {len(data)} bytes, expected {nbytes}")
                order = dtype if little else dtype.newbyteorder(">")
                storages[key] = np.frombuffer(data, order, count=numel).astype(dtype)
            return storages[key]

        if archive.getinfo(pkl[0]).file_size > _MAX_PICKLE_BYTES:
            raise ValueError(
                f"{pkl[0]}: the object pickle is larger than {_MAX_PICKLE_BYTES} bytes"
            )
        with archive.open(pkl[0]) as g:
            data = g.read(_MAX_PICKLE_BYTES + 1)
        if len(data) > _MAX_PICKLE_BYTES:
            raise ValueError(f"{pkl[0]}: the object pickle inflates past {_MAX_PICKLE_BYTES} bytes")
        result = RestrictedUnpickler(io.BytesIO(data), load_storage).load()
    return _materialise(result)


# The object pickle holds names and tensor geometry only (the data lie in storage files).
_MAX_PICKLE_BYTES = 64 << 20


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (legacy or zip format) into numpy arrays, without torch.

    Args:
        path: the file.

    Returns:
        The saved object with every tensor replaced by a numpy array (typically an
        ``OrderedDict`` state dict ``name -> array``).

    Raises:
        UnsafePickleError: the pickle refers to a global outside the allow-list.
        ValueError: the file is empty, truncated, corrupt or not a torch.save file (the
            message names the file).
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise TorchFileError(f"{path}: empty file, not a torch.save file")
        try:
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _read_zip(f)
            f.seek(0)
            return _read_legacy(f)
        except UnsafePickleError:
            raise
        except (ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError,
                IndexError, TypeError, struct.error, UnicodeDecodeError, OverflowError,
                MemoryError) as e:  # fmt: skip
            raise TorchFileError(
                f"{path}: not a readable torch.save file ({type(e).__name__}: {e})"
            ) from e


# ---------------------------------------------------------------------------------------------
# Writing (used to produce test fixtures and to export weights for torch users).


def _unicode(s: str) -> bytes:
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _int_tuple(values) -> bytes:
    return b"(" + b"".join(_int(int(v)) for v in values) + b"t"


def _state_dict_pickle(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """Protocol-2 opcodes for an OrderedDict of tensors, storage i with key str(i)."""
    out = [b"\x80\x02", b"ccollections\nOrderedDict\n)R("]
    for i, (name, a) in enumerate(arrays):
        storage = _DTYPE_TO_STORAGE[a.dtype]
        strides = [s // a.itemsize for s in a.strides] if a.size else [1] * a.ndim
        pid = b"(" + _unicode("storage") + f"ctorch\n{storage}\n".encode()
        pid += _unicode(str(i)) + _unicode("cpu") + _int(a.size) + b"Nt"
        out.append(_unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q")
        out.append(_int(0) + _int_tuple(a.shape) + _int_tuple(strides))
        out.append(b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    out.append(b"u.")
    return b"".join(out)


def _c_order(value: Any) -> np.ndarray:
    a = np.asarray(value)  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _le_bytes(a: np.ndarray) -> bytes:
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.byteswap()
    return a.tobytes()


def write_torch_file(path: str | os.PathLike, state_dict: Mapping[str, Any], *, legacy=True):
    """Write a name -> array mapping as a torch.save file that ``torch.load`` can read.

    Args:
        path: destination.
        state_dict: tensor name -> array (float64/32/16, bfloat16, int64/32/16/8, uint8, bool).
        legacy: the pre-1.6 stream format (True) or the zip format (False).
    """
    arrays = [(str(k), _c_order(v)) for k, v in state_dict.items()]
    for name, a in arrays:
        if a.dtype not in _DTYPE_TO_STORAGE:
            raise TypeError(f"state_dict[{name!r}] has unsupported dtype {a.dtype}")
    body = _state_dict_pickle(arrays)
    if legacy:
        sys_info = {
            "protocol_version": PROTOCOL_VERSION,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        }
        with open(path, "wb") as f:
            for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
                f.write(pickle.dumps(obj, protocol=2))
            f.write(body)
            f.write(pickle.dumps([str(i) for i in range(len(arrays))], protocol=2))
            for _, a in arrays:
                f.write(struct.pack("<q", a.size))
                f.write(_le_bytes(a))
    else:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", body)
            archive.writestr("archive/byteorder", "little")
            archive.writestr("archive/version", "3\n")
            for i, (_, a) in enumerate(arrays):
                archive.writestr(f"archive/data/{i}", _le_bytes(a))
