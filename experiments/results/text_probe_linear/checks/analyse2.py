import sys

import numpy as np

sys.path.insert(0, "/work/main")
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler, normalize

from hessjax.data import stratified_split, subsample_per_class
from hessjax.text import TEXT_DATASETS, text_frame

ftr = text_frame(TEXT_DATASETS["amazon_reviews"], "train")
fte = text_frame(TEXT_DATASETS["amazon_reviews"], "test")
ttr = ftr["review"].astype(str).tolist()
tte = fte["review"].astype(str).tolist()
d = np.load("/tmp/probe/feat_pretrained_L128.npz")
ytr, yte = d["ytr"], d["yte"]
assert (ytr == (ftr["score"] == "other").to_numpy()).all()
keep, val = stratified_split(ytr, 500, seed=0)
sub = keep[subsample_per_class(ytr[keep], 500, seed=0, num_classes=2)]
print(
    ftr["score"].value_counts().to_dict(), "lengths chars median", np.median([len(t) for t in ttr])
)
print("token lengths: frac truncated at 128", np.mean(d["mtr"] == 128))
for i in range(4):
    print(ytr[i], ttr[i][:200])


def fit(name, Xa, ya, Xv, yv, Xt, scale=True):
    if scale:
        sc = StandardScaler().fit(Xa)
        Xa, Xv, Xt = sc.transform(Xa), sc.transform(Xv), sc.transform(Xt)
    best = None
    for C in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10):
        clf = LogisticRegression(C=C, max_iter=5000).fit(Xa, ya)
        v = clf.score(Xv, yv)
        if best is None or v > best[0]:
            best = (
                v,
                C,
                clf.score(Xt, yte),
                roc_auc_score(yte, clf.decision_function(Xt)),
                clf.score(Xa, ya),
            )
    print(
        f"{name:40s} val {best[0]:.3f} C={best[1]:g} test {best[2]:.3f} test AUC {best[3]:.3f} train {best[4]:.3f}"  # noqa: E501
    )


F, Ft = d["tr_mean"], d["te_mean"]
fit("minilm mean, 1000 balanced", F[sub], ytr[sub], F[val], ytr[val], Ft)
fit(
    "minilm mean L2-norm, 1000 balanced",
    normalize(F[sub]),
    ytr[sub],
    normalize(F[val]),
    ytr[val],
    normalize(Ft),
    scale=False,
)
fit("minilm mean, all 3500 (natural prior)", F[keep], ytr[keep], F[val], ytr[val], Ft)
tf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit([ttr[i] for i in keep])
X = tf.transform(ttr)
Xt = tf.transform(tte)
fit("tfidf 1-2gram, 1000 balanced", X[sub], ytr[sub], X[val], ytr[val], Xt, scale=False)
fit("tfidf 1-2gram, all 3500", X[keep], ytr[keep], X[val], ytr[val], Xt, scale=False)
r = (
    np.load("/tmp/probe/feat_random_L128.npz")
    if __import__("os").path.exists("/tmp/probe/feat_random_L128.npz")
    else None
)
if r is not None:
    fit(
        "random mean, 1000 balanced",
        r["tr_mean"][sub],
        ytr[sub],
        r["tr_mean"][val],
        ytr[val],
        r["te_mean"],
    )
    fit(
        "random mean, all 3500",
        r["tr_mean"][keep],
        ytr[keep],
        r["tr_mean"][val],
        ytr[val],
        r["te_mean"],
    )
