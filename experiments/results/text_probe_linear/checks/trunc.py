import sys

import numpy as np

sys.path.insert(0, "/work/main")
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hessjax.data import stratified_split, subsample_per_class

for init in ("pretrained", "random"):
    d = np.load(f"/tmp/probe/feat_{init}_L128.npz")
    ytr, yte = d["ytr"], d["yte"]
    keep, val = stratified_split(ytr, 500, seed=0)
    sub = keep[subsample_per_class(ytr[keep], 500, seed=0, num_classes=2)]
    sc = StandardScaler().fit(d["tr_mean"][sub])
    clf = LogisticRegression(C=0.01, max_iter=5000).fit(sc.transform(d["tr_mean"][sub]), ytr[sub])
    ok = clf.predict(sc.transform(d["te_mean"])) == yte
    tr = d["mte"] == 128
    print(
        init,
        f"test truncated {tr.mean():.3f}: acc truncated {ok[tr].mean():.3f} (n={tr.sum()}), not truncated {ok[~tr].mean():.3f}; 'other' rate trunc {yte[tr].mean():.2f} vs {yte[~tr].mean():.2f}",  # noqa: E501
    )
