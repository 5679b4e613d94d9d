"""The environment of a run: the code's commit, JAX's compilation cache, the device mesh."""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_mesh", "git_commit", "use_compilation_cache"]


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


def use_compilation_cache(directory: str | Path) -> None:
    """Keep XLA's compiled programs in ``directory`` (JAX's persistent compilation cache).

    Experiments fine-tune many models of the same shapes; with the cache, a training step
    or evaluation compiled once (in this process or an earlier one) is read back instead of
    compiled again. Programs whose constants differ (another transition matrix, other
    BatchNorm statistics closed over by a loss) still compile. This sets global JAX options,
    so it belongs in scripts and the command line, never in library code.

    Args:
      directory: the cache folder (created if needed).
    """
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
