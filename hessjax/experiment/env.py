"""The environment of a run: the code's commit, JAX's compilation cache, the device mesh."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_mesh", "default_compilation_cache_dir", "git_commit", "use_compilation_cache"]


def data_mesh(devices: int | str | None):
    """The data-parallel mesh for ``devices`` (an int, ``"all"``; None: one device, no mesh)."""
    if devices is None:
        return None
    from hessjax.sharding import make_mesh

    return make_mesh(None if devices == "all" else devices)


def git_commit() -> str | None:
    """The git commit of the working tree hessjax runs from, if it is a checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


CACHE_ENV = "HESSJAX_COMPILATION_CACHE"


def default_compilation_cache_dir() -> Path:
    """Where the CLI and the experiments keep JAX's compiled programs.

    ``$HESSJAX_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/hessjax/jax`` (by default
    ``~/.cache/hessjax/jax``).

    Example:
      >>> default_compilation_cache_dir().name in ("jax", os.environ.get(CACHE_ENV, "jax"))
      True
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hessjax" / "jax"


def use_compilation_cache(directory: str | Path | None = None) -> Path:
    """Keep XLA's compiled programs in ``directory`` (JAX's persistent compilation cache).

    Experiments fine-tune many models of the same shapes, and the estimators compile one step
    per computation (:func:`hessjax.mapping.compile_once`); with the cache, a program compiled
    once (in this process or an earlier one) is read back instead of compiled again, so a
    second process pays nothing for it. Programs whose constants differ (another transition
    matrix, other BatchNorm statistics closed over by a loss) still compile. The CLI and the
    experiments call this by default (``--no-compilation-cache`` turns it off). This sets
    global JAX options, so it belongs in scripts and the command line, never in library code.

    Args:
      directory: the cache folder (created if needed); ``None``:
        :func:`default_compilation_cache_dir`.

    Returns:
      The absolute cache directory.
    """
    import jax

    path = Path(default_compilation_cache_dir() if directory is None else directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
