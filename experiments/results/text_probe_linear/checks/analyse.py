import sys

import numpy as np

sys.path.insert(0, "/work/main")
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hessjax.data import load_splits, stratified_split, subsample_per_class

init = sys.argv[1]
L = 128
d = np.load(f"/tmp/probe/feat_{init}_L{L}.npz")
ytr, yte = d["ytr"], d["yte"]
keep, val = stratified_split(ytr, 500, seed=0)
keep = keep[subsample_per_class(ytr[keep], 500, seed=0, num_classes=2)]
# check against load_splits
s = load_splits(f"amazon_reviews:{L}", seed=0, val_size=500, n_per_class=500)
from hessjax.text import load_text  # noqa: E402

xtr, _, _ = load_text(f"amazon_reviews:{L}", "train")
assert (
    (s.train_images == xtr[keep]).all()
    and (s.val_images == xtr[val]).all()
    and (s.train_labels == ytr[keep]).all()
)
print(
    "train counts", np.bincount(ytr[keep]), "val", np.bincount(ytr[val]), "test", np.bincount(yte)
)
for feat in ("mean", "cls", "meanall"):
    Ftr, Fte = d["tr_" + feat], d["te_" + feat]
    sc = StandardScaler().fit(Ftr[keep])
    a, v, t = sc.transform(Ftr[keep]), sc.transform(Ftr[val]), sc.transform(Fte)
    for C in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1, 10):
        clf = LogisticRegression(C=C, max_iter=5000).fit(a, ytr[keep])
        # prior correction: train balanced, population 65/35 (full training file)
        pri = np.bincount(ytr) / len(ytr)
        dv = clf.decision_function(v) + np.log(pri[1] / pri[0])
        dt = clf.decision_function(t) + np.log(pri[1] / pri[0])
        print(
            f"{feat:8s} C={C:g} train {clf.score(a, ytr[keep]):.3f} val {clf.score(v, ytr[val]):.3f} test {clf.score(t, yte):.3f} | prior-corrected val {np.mean((dv > 0) == ytr[val]):.3f} test {np.mean((dt > 0) == yte):.3f}  test pred-other {np.mean(clf.predict(t)):.2f}"  # noqa: E501
        )
