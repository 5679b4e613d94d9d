"""The run directory's checkpoints: one atomic record of what is committed, an advisory lock.

Layout of ``workdir/checkpoints`` (this module alone knows it)::

    commit.json        {"format": 1, "last": V, "best": W | null}: the committed versions
    last/<V>/          orbax items "state" (params, rest, opt_state) and "meta" (JSON)
    best/<W>/          orbax items "state" (params, rest) and "meta" (JSON)

Versions are save counters, never training steps, so a version is never written twice: a
replayed epoch end saves new versions instead of colliding with an old one. A commit writes
the new versions (each atomically, by orbax's temporary directory and rename), then replaces
``commit.json`` atomically (``os.replace`` of an fsynced file), then deletes the versions the
record no longer names. A process killed at any instant therefore leaves a directory whose
``commit.json`` names complete checkpoints; versions it does not name (a save in flight, a
deletion not yet done) are removed when the next run opens the directory.

The lock (:class:`RunLock`) is ``fcntl.flock`` on ``workdir/.lock``: held by one process at a
time, released by the kernel when the process ends (a lock file left behind by a killed run
is stale and is taken over), re-entrant within a process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hessjax.partition import path_name

PyTree = Any

__all__ = [
    "Checkpointer",
    "RunLock",
    "load_tree",
    "replace_tree",
    "restore_checkpoint",
    "save_tree",
]

_FORMAT = 1
FAULT_ENV = "HESSJAX_FAULT"


def _fault(point: str) -> None:
    """Test hook: ``HESSJAX_FAULT="<point>:<k>"`` kills this process (SIGKILL) the k-th time
    ``point`` is reached (points: ``save_begin``, ``best_end`` (best/ written, last/ not yet),
    ``save_end``, ``commit_end``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, k = spec.partition(":")
    if name != point:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ lock
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


class RunLock:
    """An advisory, re-entrant, process-wide lock on a run directory (``workdir/.lock``).

    Args:
      workdir: the run directory (created if missing: taking the lock is the first write).

    Raises:
      ValueError: another live process holds the lock (names the directory and its pid).

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with RunLock(d), RunLock(d):  # re-entrant in one process
      ...     pass
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir).absolute() / ".lock"

    def __enter__(self) -> RunLock:
        import fcntl

        with _HELD_GUARD:
            held = _HELD.get(self.path)
            if held is not None:
                held[1] += 1
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ValueError(
                        f"output_dir: {self.path.parent} is in use by another run (process "
                        f"{owner} holds {self.path}); wait for it or choose another directory"
                    ) from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD[self.path] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        with _HELD_GUARD:
            held = _HELD[self.path]
            held[1] -= 1
            if held[1] == 0:
                os.close(held[0])  # closing the descriptor releases the flock
                del _HELD[self.path]


# ------------------------------------------------------------------------------ trees
def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_tree(path: str | os.PathLike, tree: PyTree) -> None:
    """Save a pytree of arrays to ``path`` (orbax), replacing an existing one atomically.

    The tree is written next to ``path`` first; the old directory (if any) is renamed aside,
    the new one into place, and the old one deleted, so at every instant ``path`` or its
    ``.old`` sibling holds a complete tree (:func:`load_tree` reads either).
    """
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
    replace_tree(tmp, path)


def replace_tree(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is swapped out, then deleted."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def load_tree(path: str | os.PathLike, target: PyTree) -> PyTree:
    """Restore a tree saved by :func:`save_tree` into ``target``'s shapes and dtypes.

    Raises:
      ValueError: missing, corrupt or mismatched (names the path).
    """
    path = Path(path).absolute()
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # killed between the two renames
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist (run `hessjax finetune` first)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, _abstract(target))
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ValueError(f"checkpoint: {path} is corrupt or does not match the model: {e}") from e


# ------------------------------------------------------------------------------ fingerprint
def shapes(tree) -> dict[str, list[int]]:
    """``{leaf path: shape}`` of a pytree (the model part of a fingerprint)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): list(jax.numpy.shape(v)) for p, v in leaves}


def compare_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """Raise a ValueError listing every difference between two fingerprints."""
    problems = []
    if saved.get("params") != current.get("params"):
        s, c = saved.get("params", {}), current.get("params", {})
        diff = sorted(set(s) ^ set(c))[:5] or [k for k in c if s.get(k) != c[k]][:5]
        problems.append(
            f"the model differs (parameter names/shapes, e.g. {diff}: checkpoint "
            f"{[s.get(k) for k in diff]} vs model {[c.get(k) for k in diff]})"
        )
    for section, prefix in (("config", "config."), ("data", "data."), ("extra", "")):
        a_all, b_all = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a_all) | set(b_all)):
            a, b = a_all.get(key), b_all.get(key)
            if a != b:
                problems.append(f"{prefix}{key} = {a!r} in the checkpoint, {b!r} now")
    if problems:
        raise ValueError(
            f"checkpoint in {where} does not match this run (use another output directory or "
            "start afresh): " + "; ".join(problems)
        )


# ------------------------------------------------------------------------------ checkpointer
class Checkpointer:
    """The checkpoints of one run directory: restore, commit, and garbage collection.

    Nothing is written until :meth:`commit` (or :meth:`collect_garbage`), so a run that is
    rejected (a mismatched fingerprint) leaves the directory as it was. Hold a
    :class:`RunLock` on the directory while committing.

    Args:
      workdir: the run directory.

    Example:
      >>> import tempfile, numpy as np
      >>> c = Checkpointer(tempfile.mkdtemp())
      >>> c.committed()
      {'format': 1, 'last': None, 'best': None}
      >>> c.commit({"w": np.zeros(2)}, {"step": 1})
      >>> c.restore_last({"w": np.zeros(2)})[1]["step"]
      1
    """

    def __init__(self, workdir: str | os.PathLike):
        self.root = Path(workdir).absolute() / "checkpoints"
        self.record_path = self.root / "commit.json"
        self._managers: dict[str, ocp.CheckpointManager] = {}

    # -- reading
    def committed(self) -> dict:
        """The committed record; for a directory written before the record existed, the
        latest complete step of each manager; for an empty directory, no versions."""
        if self.record_path.exists():
            try:
                record = json.loads(self.record_path.read_text())
                if record.get("format") != _FORMAT:
                    raise ValueError(f"unknown format {record.get('format')!r}")
                return {"format": _FORMAT, "last": record["last"], "best": record["best"]}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"checkpoint: {self.record_path} is corrupt ({e}); start afresh in another "
                    "output directory"
                ) from e
        legacy = {"format": _FORMAT, "last": None, "best": None}
        for kind in ("last", "best"):
            if (self.root / kind).is_dir():
                legacy[kind] = self._manager(kind, create=False).latest_step()
        return legacy

    def has_checkpoint(self) -> bool:
        """Whether a committed ``last`` checkpoint exists."""
        return self.committed()["last"] is not None

    def restore_last(self, target: PyTree, fingerprint: dict | None = None):
        """``(state, meta)`` of the committed last checkpoint, or None when there is none.

        Args:
          target: a pytree like the saved state (shapes and dtypes).
          fingerprint: compared with the saved one first (a ValueError names differences).
        """
        version = self.committed()["last"]
        if version is None:
            return None
        return self._restore("last", version, target, fingerprint)

    def restore_best(self, target: PyTree):
        """``(state, meta)`` of the committed best checkpoint (params and rest)."""
        version = self.committed()["best"]
        if version is None:
            raise ValueError(f"checkpoint: no best checkpoint in {self.root / 'best'}")
        return self._restore("best", version, target, None)

    def _restore(self, kind, version, target, fingerprint):
        mgr = self._manager(kind, create=False)
        where = self.root / kind / str(version)
        try:
            meta = mgr.restore(version, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # noqa: BLE001 - re-raised with the directory named
            raise ValueError(f"checkpoint: {where} is corrupt or unreadable: {e}") from e
        if fingerprint is not None:
            compare_fingerprint(meta.get("fingerprint", {}), fingerprint, where)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)))
            state = mgr.restore(version, args=args)["state"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"checkpoint: {where} is corrupt or does not match: {e}") from e
        return state, meta

    # -- writing
    def commit(self, state: PyTree, meta: dict, best: PyTree | None = None) -> None:
        """Save ``state`` (and ``best``) with ``meta`` as new versions and commit them at once.

        Args:
          state: the resumable state (params, rest, opt_state).
          meta: JSON metadata (step, epoch, history, fingerprint, ...).
          best: the best checkpoint's state, or None to keep the committed best.
        """
        record = self.committed()
        version = self._next_version(record)
        _fault("save_begin")
        if best is not None:
            self._save("best", version, best, meta)
            record["best"] = version
            version += 1
            _fault("best_end")
        self._save("last", version, state, meta)
        record["last"] = version
        _fault("save_end")
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.record_path, record)
        _fault("commit_end")
        self.collect_garbage(record)

    def collect_garbage(self, record: dict | None = None) -> None:
        """Delete every version (and orbax temporary directory) the record does not name."""
        record = self.committed() if record is None else record
        for kind in ("last", "best"):
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if child.name != str(record[kind]) and (child.is_dir() or ".orbax" in child.name):
                    shutil.rmtree(child, ignore_errors=True)
            self._managers.pop(kind, None)  # its cached step list is stale now

    def _next_version(self, record) -> int:
        seen = [v for v in (record["last"], record["best"]) if v is not None]
        for kind in ("last", "best"):
            folder = self.root / kind
            if folder.is_dir():
                seen += [int(c.name) for c in folder.iterdir() if c.name.isdigit()]
        return max(seen, default=-1) + 1

    def _save(self, kind, version, items, meta) -> None:
        mgr = self._manager(kind, create=True)
        mgr.save(
            version,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mgr.wait_until_finished()

    def _manager(self, kind: str, *, create: bool) -> ocp.CheckpointManager:
        if kind not in self._managers:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None,  # retention is the record's business (collect_garbage)
                enable_async_checkpointing=False,
                create=create,
            )
            self._managers[kind] = ocp.CheckpointManager(
                self.root / kind, options=options, item_names=("state", "meta")
            )
        return self._managers[kind]

    def close(self) -> None:
        """Close the orbax managers."""
        for mgr in self._managers.values():
            mgr.close()
        self._managers.clear()


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: PyTree, fingerprint: dict | None = None
) -> tuple[PyTree, dict]:
    """Restore ``(state, meta)`` of the latest step of an orbax manager into ``target``'s shape.

    Kept for checkpoints written by other code; a run directory written by
    :func:`hessjax.train.fit` is read with :class:`Checkpointer` (its committed record).

    Args:
      manager: an ``ocp.CheckpointManager`` with items ``state`` (StandardSave) and ``meta``
        (JsonSave).
      target: a pytree like the saved state (its shapes and dtypes are used).
      fingerprint: when given, compared with the saved ``meta["fingerprint"]`` first.

    Returns:
      The restored state and meta dict.

    Raises:
      ValueError: no checkpoint; a mismatched fingerprint (names the differences); an
        unreadable/corrupt checkpoint (names the directory and the error).
    """
    step = manager.latest_step()
    where = Path(manager.directory)
    if step is None:
        raise ValueError(f"checkpoint: no checkpoint found in {where}")
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ValueError(
            f"checkpoint: {where}/{step} is corrupt or unreadable (metadata): {e}"
        ) from e
    if fingerprint is not None:
        compare_fingerprint(meta.get("fingerprint", {}), fingerprint, where / str(step))
    try:
        state = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)))
        )["state"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"checkpoint: {where}/{step} is corrupt or does not match the model: {e}"
        ) from e
    return state, meta
