import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, "/work/main")
from hessjax.models import bert_classifier
from hessjax.text import load_text

L = int(sys.argv[1])
init = sys.argv[2]
xtr, ytr, _ = load_text(f"amazon_reviews:{L}", "train")
xte, yte, _ = load_text(f"amazon_reviews:{L}", "test")
model = bert_classifier(2, pretrained=init == "pretrained", seed=0)
g, st = nnx.split(model)


@jax.jit
def f(st, xb):
    m = nnx.merge(g, st)
    ids, mask, types = xb[:, 0], xb[:, 1], xb[:, 2]
    h = m.bert(ids, mask, types)
    mm = mask.astype(h.dtype)[..., None]
    mean = jnp.sum(h * mm, 1) / jnp.maximum(jnp.sum(mm, 1), 1e-9)
    meanall = h.mean(1)
    return mean, h[:, 0], meanall


def run(x, bs=50):
    outs = [[], [], []]
    t0 = time.time()
    for i in range(0, len(x), bs):
        r = f(st, x[i : i + bs])
        for o, v in zip(outs, r, strict=True):
            o.append(np.asarray(v))
    print(len(x), time.time() - t0, flush=True)
    return [np.concatenate(o) for o in outs]


tr = run(xtr)
te = run(xte)
np.savez(
    f"/tmp/probe/feat_{init}_L{L}.npz",
    tr_mean=tr[0],
    tr_cls=tr[1],
    tr_meanall=tr[2],
    te_mean=te[0],
    te_cls=te[1],
    te_meanall=te[2],
    ytr=ytr,
    yte=yte,
    mtr=xtr[:, 1].sum(1),
    mte=xte[:, 1].sum(1),
)
