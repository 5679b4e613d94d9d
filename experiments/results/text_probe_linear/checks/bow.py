import sys

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, "/work/main")
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression

from hessjax.data import load_splits

s = load_splits("amazon_reviews:128", seed=0, val_size=500, n_per_class=500)


def counts(x):
    ids = np.where(x[:, 1] > 0, x[:, 0], 0)
    ids = np.where(ids == 101, 0, ids)
    ids = np.where(ids == 102, 0, ids)
    rows = np.repeat(np.arange(len(x)), x.shape[2])
    m = sp.csr_matrix((np.ones(ids.size), (rows, ids.ravel())), shape=(len(x), 30522))
    m[:, 0] = 0
    m.eliminate_zeros()
    return m


tf = TfidfTransformer(sublinear_tf=True).fit(counts(s.train_images))
a, v, t = (tf.transform(counts(x)) for x in (s.train_images, s.val_images, s.test_images))
for C in np.logspace(-2, 2, 9):
    clf = LogisticRegression(C=C, max_iter=3000).fit(a, s.train_labels)
    print(f"{C:.3g} val {clf.score(v, s.val_labels):.3f} test {clf.score(t, s.test_labels):.3f}")
