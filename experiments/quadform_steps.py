"""How many Lanczos steps a quadratic form ``v^T f(H) v`` needs, with and without
reorthogonalisation (issue 18: the accuracy side of ``reorthogonalize=False``).

The model and batch of ``bench_peers.py`` (ImageNet MobileNetV2 + a 10-class head, 32x32,
batch 32, 2.2M parameters), ``v`` = all ones (the benchmark's ``quadform`` task). For each
number of steps ``m`` and each of ``reorthogonalize=True/False`` it computes
:func:`hessjax.estimators.quadratic_form` for ``f`` = the positive part (the measure's
``v^T H^+ v``) and ``f`` = the identity, whose exact value ``v^T H v`` is one product (the
check that the recurrence itself is right: the Gauss rule with ``m`` nodes is exact for
polynomials of degree ``2m - 1``). The positive part is not smooth at 0 and this Hessian has
much of its mass near 0 on both sides, so its Gauss rule converges slowly in ``m``; the script
shows how far each variant is from the other at each ``m``. Writes JSON with the command and
commit.

    .venv/bin/python experiments/quadform_steps.py --out experiments/results/quadform_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80, 120])
    p.add_argument("--out", type=Path, default=Path("experiments/results/quadform_steps.json"))
    args = p.parse_args(argv)
    if any(m < 1 for m in args.steps):
        raise SystemExit(f"--steps: expected positive integers, got {args.steps}")

    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_peers

    import hessjax
    import hessjax.experiment as hexp
    from hessjax import estimators

    hexp.use_compilation_cache()
    inputs = Path(tempfile.mkdtemp()) / "inputs.npz"
    bench_peers.shared_inputs(inputs)
    params, loss, _, batch, _ = bench_peers.problem("mobilenet_v2", inputs)
    matvec = hessjax.hvp_fn(loss, params, batch)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    exact = float(optax.tree_utils.tree_vdot(v, matvec(v)))
    rows = []
    for m in args.steps:
        for reorth in (True, False):
            row = {"steps": m, "reorthogonalize": reorth}
            for name, f in (("positive_part", estimators.positive_part), ("identity", lambda x: x)):
                t = time.perf_counter()
                q = estimators.quadratic_form(matvec, v, f, num_iters=m, reorthogonalize=reorth)
                row[name] = float(q)
                row[f"{name}_s"] = time.perf_counter() - t
            row["identity_rel_error"] = abs(row["identity"] - exact) / abs(exact)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "quadratic_form steps, MobileNetV2 32x32 batch 32, v = ones",
        "command": " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "commit": hexp.git_commit(),
        "vHv_exact": exact,
        "rows": rows,
        "note": "times include the first call of each (steps, variant): compile, not a benchmark",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
