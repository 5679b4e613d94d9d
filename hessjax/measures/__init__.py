"""The paper's Hessian distance measure and its companion measures.

For a fine-tuned model ``params`` and its pretrained ``anchor``, with ``v_i = W_i - anchor_i``
the displacement of layer ``i`` (layers from a :class:`~hessjax.partition.Partition`):

    calH_i  = max over examples (x, y) of  v_i^T H_i^+[loss(params, (x, y))] v_i
    measure = sum_i sqrt(calH_i / n)

where ``H_i`` is the diagonal Hessian block of layer ``i`` for ONE example's loss, ``H^+`` its
positive part (negative eigenvalues set to zero) and ``n`` the training-set size. The positive
part is applied by Lanczos (Gauss) quadrature started at ``v_i``, exact once the number of
Lanczos steps reaches the layer's dimension (or its Krylov space is exhausted).

Companions: per-layer distances from the anchor, per-layer maximal and mean traces of
``H_i^+`` (for the distance-constraint corollary), the spectral norms used by the classical
baseline bound, and noise stability under Gaussian weight noise with its Hessian-trace
prediction. :func:`report` turns the results into a per-layer table that prints and serialises.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022 (arXiv:2206.02659), Theorem 2.1, Corollary, Lemma.
"""

from hessjax.measures._checks import displacement
from hessjax.measures.companions import (
    LayerTraces,
    NoiseStability,
    distances,
    layer_traces,
    noise_stability,
    spectral_norms,
)
from hessjax.measures.distance import VARIANTS, HessianDistance, hessian_distance
from hessjax.measures.report import Report, report

__all__ = [
    "VARIANTS",
    "HessianDistance",
    "LayerTraces",
    "NoiseStability",
    "Report",
    "displacement",
    "distances",
    "hessian_distance",
    "layer_traces",
    "noise_stability",
    "report",
    "spectral_norms",
]
