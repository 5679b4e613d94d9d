"""Matrix-free estimators for a symmetric operator given as a matvec ``v -> H v``.

Trace (Hutchinson, Hutch++), Lanczos with full reorthogonalisation, extreme eigenvalues,
spectral density (stochastic Lanczos quadrature), quadratic forms ``v^T f(H) v`` (Gauss
quadrature), ``Tr f(H)`` and a PyHessian-style power iteration for comparison.

Conventions (as in matfree): an estimator is a pure function that takes the operator as a
``matvec`` over params-shaped pytrees (any symmetric linear operator: a Hessian from
:func:`hessjax.hessian.hvp_fn`, the block-diagonal layer Hessian from
:func:`hessjax.hessian.block_hvp_fn`, a dense matrix), a ``like`` pytree that fixes the shapes, and,
where random, an explicit PRNG ``key``. Static sizes (``num_probes``, ``num_iters``, ``k``,
``chunk_size``) are keyword-only. Everything is jittable with the matvec closed over; probes are
vmapped in chunks of ``chunk_size`` (:func:`hessjax.hessian.chunked_vmap`). Random estimators return
an :class:`Estimate` ``(value, stderr)``.

Per-layer versions: given a :class:`~hessjax.partition.Partition` the matvec is assumed to be
block-diagonal over its layers (``v -> (H_11 v_1, ..., H_LL v_L)``). Layers are disjoint, so all
layers run at once on one params-shaped pytree: one matvec per step serves every layer, and the
per-layer scalars (inner products, norms, Lanczos coefficients) get a leading axis ``L``.
Leaves that belong to no layer are ignored (set to zero in probes and start vectors).

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines", 1989.
  Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
  Lanczos, 1950; Golub & Meurant, "Matrices, moments and quadrature", 1994/2010.
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
  SIAM J. Matrix Anal. Appl. 2017.
  Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Yao, Gholami, Keutzer & Mahoney, "PyHessian", 2020 (power iteration with deflation).
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659): the truncated forms ``v_i^T H_i^+ v_i``.

Submodules: ``trace`` (Hutchinson, Hutch++), ``lanczos`` (Lanczos, eigenvalues), ``quadrature``
(``v^T f(H) v``, ``Tr f(H)``, spectral density), ``power`` (power iteration).
"""

from hessjax.estimators._base import Estimate, random_flat
from hessjax.estimators.lanczos import LanczosResult, eigenvalues, lanczos
from hessjax.estimators.power import power_iteration
from hessjax.estimators.quadrature import (
    SpectralDensity,
    positive_part,
    positive_quadratic_form,
    quadratic_form,
    spectral_density,
    trace_of_function,
)
from hessjax.estimators.trace import hutchinson_trace, hutchpp_trace

__all__ = [
    "Estimate",
    "LanczosResult",
    "SpectralDensity",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "eigenvalues",
    "spectral_density",
    "quadratic_form",
    "positive_part",
    "positive_quadratic_form",
    "trace_of_function",
    "power_iteration",
    "random_flat",
]
