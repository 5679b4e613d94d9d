"""Runs of the application: fine-tuning experiments as directories, their measures, the demo.

The layer between the library (core: :mod:`hessjax.measures`, :mod:`hessjax.transforms`, ...;
application: :mod:`hessjax.train`, :mod:`hessjax.models`, :mod:`hessjax.data`) and its shells
(the ``hessjax`` command, ``experiments/``, ``colab/``), which use only these public names.

* :class:`RunConfig` / :class:`DemoConfig`: the settings, with their defaults.
* :func:`finetune`: one run into a directory (resumable, a finished run is a no-op);
  :func:`load_run` and :func:`measure_run` read it back and measure it; :func:`demo`.
* :class:`RunCache`: the memo of splits, trunk features and per-model losses.
* :func:`tune_then_seeds` and :data:`GRIDS`: the reference code's protocol (every method
  with early stopping and its best clean-validation checkpoint, tuned on one seed, reported on
  fresh ones); :func:`bootstrap_correlations`, :func:`paired_difference`: the statistics.
* :func:`select_by_bound`: choose a radius/method from the Theorem-2.1 bound on the
  training data alone (no validation set).
* :func:`git_commit`, :func:`use_compilation_cache`, :func:`data_mesh`: the environment.

Example:
  >>> from hessjax.experiment import RunConfig
  >>> RunConfig(dataset="digits", model="tiny_cnn").method
  'plain'
"""

from hessjax.experiment.config import (
    MOBILENET_RADII,
    NOISE_TYPES,
    RESUMABLE_OPTIONS,
    DemoConfig,
    RunConfig,
    run_fingerprint,
)
from hessjax.experiment.data import RunCache, first_block, make_run_model, noise_transition
from hessjax.experiment.demo import demo, demo_table
from hessjax.experiment.env import data_mesh, git_commit, use_compilation_cache
from hessjax.experiment.protocol import (
    GRIDS,
    bootstrap_correlations,
    coordinate_search,
    correlations,
    grid_edges,
    paired_difference,
    tune_then_seeds,
)
from hessjax.experiment.runs import (
    DEFAULT_CACHE,
    Run,
    finetune,
    load_run,
    measure_run,
    read_config,
    write_json,
)
from hessjax.experiment.select import select_by_bound

__all__ = [
    "DEFAULT_CACHE",
    "GRIDS",
    "MOBILENET_RADII",
    "NOISE_TYPES",
    "RESUMABLE_OPTIONS",
    "DemoConfig",
    "Run",
    "RunCache",
    "RunConfig",
    "bootstrap_correlations",
    "coordinate_search",
    "correlations",
    "data_mesh",
    "demo",
    "demo_table",
    "finetune",
    "first_block",
    "git_commit",
    "grid_edges",
    "load_run",
    "make_run_model",
    "measure_run",
    "noise_transition",
    "paired_difference",
    "read_config",
    "run_fingerprint",
    "select_by_bound",
    "tune_then_seeds",
    "use_compilation_cache",
    "write_json",
]
