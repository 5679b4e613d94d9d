"""Tests for hessjax.data: IDX parsing, the three sources (tfds through mock_data), seeded
splits, the small-data regime, ImageNet preprocessing, noisy labels and the batch iterator."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from hessjax import data
from hessjax.data import (
    imagenet_preprocess,
    iterate_batches,
    load_dataset,
    load_splits,
    read_idx,
    resize_images,
    stratified_split,
    subsample_per_class,
)
from hessjax.noise import symmetric_transition

REAL_FASHION = Path(data.FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz"


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    """An IDX file written from the format description (independent of read_idx)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = array.astype(">i4")
    raw = bytes([0, 0, 0x08 if array.dtype == np.uint8 else 0x0C, array.ndim])
    raw += b"".join(int(s).to_bytes(4, "big") for s in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def fake_fashion(tmp_path):
    """Tiny Fashion-MNIST-shaped files: 40 train / 20 test images, balanced over 10 classes."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx(tmp_path, compress):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4) - 5
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, a, compress=compress)
    back = read_idx(path)
    np.testing.assert_array_equal(back, a)
    assert back.shape == (2, 3, 4) and back.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    write_idx(path, np.zeros((3, 2), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(path)


def test_fashion_mnist_from_data_dir_and_env(fake_fashion, monkeypatch):
    images, labels = load_dataset("fashion_mnist", "train", data_dir=fake_fashion)
    raw = gzip.decompress((fake_fashion / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    expected = np.frombuffer(raw, np.uint8).reshape(40, 28, 28, 1) / 255.0
    assert images.shape == (40, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.tolist() == [i % 10 for i in range(40)]
    np.testing.assert_allclose(images, expected, rtol=1e-6)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(fake_fashion))
    images_env, _ = load_dataset("fashion_mnist", "test")
    assert images_env.shape == (20, 28, 28, 1)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)


@pytest.mark.skipif(not REAL_FASHION.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    images, labels = load_dataset("fashion_mnist", "test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.99
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


def test_digits():
    train_x, train_y = load_dataset("digits", "train")
    test_x, test_y = load_dataset("digits", "test")
    assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1)
    assert train_x.dtype == np.float32 and train_y.dtype == np.int32
    assert train_x.min() == 0.0 and train_x.max() == 1.0
    assert set(np.unique(test_y)) == set(range(10))
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(test_y, load_digits().target[1437:])


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        images, labels = load_dataset("tfds:mnist", "train")
        source = tfds.data_source("mnist", split="train")
        first = source[3]
        splits = load_splits("tfds:mnist", seed=0, val_size=0.2, image_size=14)
    assert images.shape == (30, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 10
    np.testing.assert_allclose(images[3], first["image"] / 255.0, rtol=1e-6)
    assert labels[3] == first["label"]
    assert splits.num_classes == 10 and splits.train_images.shape[1:] == (14, 14, 1)
    assert len(splits.train_labels) + len(splits.val_labels) == 30


def test_tfds_errors(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="name: no tensorflow-datasets dataset"):
        load_dataset("tfds:no_such_dataset_xyz", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        load_dataset("tfds:mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name, split, match",
    [
        ("mnist", "train", "name: expected 'fashion_mnist', 'digits' or 'tfds:<dataset>'"),
        ("tfds:", "train", "name: expected"),
        ("digits", "validation", "split: expected 'train' or 'test' for digits, got 'validation'"),
        ("fashion_mnist", "val", "split: expected 'train' or 'test'"),
    ],
)
def test_bad_name_or_split(name, split, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(name, split)


# ---------------------------------------------------------------------------------------------
# Splits and subsets


def test_stratified_split_fraction_and_count():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    assert np.intersect1d(keep, held).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    keep2, held2 = stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(held, held2)
    _, held3 = stratified_split(labels, 0.1, seed=4)
    assert not np.array_equal(held, held3)
    _, held_count = stratified_split(labels, 7, seed=0)
    assert held_count.size == 7
    assert (
        np.abs(np.bincount(labels[held_count], minlength=4) - 7 * np.array([1, 2, 3, 4]) / 10).max()
        < 1
    )
    for bad in (0.0, 1.0, 0, 100, -1, True):
        with pytest.raises(ValueError, match="size: expected"):
            stratified_split(labels, bad, seed=0)


def test_subsample_per_class():
    labels = np.repeat(np.arange(3), [5, 8, 6])
    idx = subsample_per_class(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
    assert np.unique(idx).size == idx.size
    np.testing.assert_array_equal(idx, subsample_per_class(labels, 4, seed=0))
    with pytest.raises(ValueError, match=r"n_per_class: expected an int in \[1, 5\]"):
        subsample_per_class(labels, 6, seed=0)
    with pytest.raises(ValueError, match="n_per_class"):
        subsample_per_class(labels, 2, seed=0, num_classes=4)  # class 3 absent
    with pytest.raises(TypeError, match="seed"):
        subsample_per_class(labels, 2, seed=None)


def _hashes(images):
    return {hashlib.sha1(x.tobytes()).hexdigest() for x in images}


def test_load_splits_deterministic_and_disjoint():
    a = load_splits("digits", seed=0, val_size=200, n_per_class=30, test_size=100)
    b = load_splits("digits", seed=0, val_size=200, n_per_class=30, test_size=100)
    c = load_splits("digits", seed=1, val_size=200, n_per_class=30, test_size=100)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (300, 8, 8, 1) and a.val_images.shape == (200, 8, 8, 1)
    assert np.bincount(a.train_labels).tolist() == [30] * 10
    assert a.test_images.shape[0] == 100 and a.num_classes == 10
    np.testing.assert_array_equal(a.train_labels, a.train_clean_labels)
    train_x, _ = load_dataset("digits", "train")
    test_x, _ = load_dataset("digits", "test")
    assert _hashes(a.train_images) <= _hashes(train_x) and _hashes(a.val_images) <= _hashes(train_x)
    assert _hashes(a.test_images) <= _hashes(test_x)
    # no image of the validation set is a training image (digits has a few exact duplicates)
    train_idx = [
        i
        for i, x in enumerate(train_x)
        if hashlib.sha1(x.tobytes()).hexdigest() in _hashes(a.train_images)
    ]
    val_idx = [
        i
        for i, x in enumerate(train_x)
        if hashlib.sha1(x.tobytes()).hexdigest() in _hashes(a.val_images)
    ]
    duplicates = len(train_x) - len(_hashes(train_x))
    assert len(set(train_idx) & set(val_idx)) <= 2 * duplicates


def test_load_splits_noisy_train_labels_clean_val_test():
    rate = 0.4
    clean = load_splits("digits", seed=5, val_size=0.2)
    noisy = load_splits(
        "digits", seed=5, val_size=0.2, transition=symmetric_transition(rate, num_classes=10)
    )
    np.testing.assert_array_equal(noisy.train_clean_labels, clean.train_labels)
    np.testing.assert_array_equal(noisy.val_labels, clean.val_labels)
    np.testing.assert_array_equal(noisy.test_labels, clean.test_labels)
    flipped = noisy.train_labels != noisy.train_clean_labels
    n = flipped.size
    assert abs(flipped.mean() - rate) <= 4 * np.sqrt(rate * (1 - rate) / n)
    assert noisy.train_labels.dtype == np.int32
    # symmetric noise: the wrong labels are spread over all other classes
    wrong = noisy.train_labels[flipped] - noisy.train_clean_labels[flipped]
    assert np.unique(wrong % 10).size == 9
    with pytest.raises(ValueError, match="transition"):
        load_splits("digits", seed=0, transition=symmetric_transition(0.2, num_classes=3))
    # T as a function of the number of classes (learnt from the data set): the same draws
    seen = []
    by_k = load_splits("digits", seed=5, val_size=0.2,
                       transition=lambda k: seen.append(k) or symmetric_transition(rate, num_classes=k))  # fmt: skip
    assert seen == [10]
    np.testing.assert_array_equal(by_k.train_labels, noisy.train_labels)


def test_load_splits_bad_arguments():
    with pytest.raises(ValueError, match="n_per_class"):
        load_splits("digits", seed=0, n_per_class=10_000)
    with pytest.raises(ValueError, match="size: expected"):
        load_splits("digits", seed=0, val_size=1.5)
    with pytest.raises(ValueError, match="test_size"):
        load_splits("digits", seed=0, test_size=10_000)
    with pytest.raises(ValueError, match="name"):
        load_splits("cifar10", seed=0)


# ---------------------------------------------------------------------------------------------
# Preprocessing and batches


def test_imagenet_preprocess():
    grey = np.full((2, 8, 8, 1), 0.5, np.float32)
    out = imagenet_preprocess(grey, size=16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    expected = (0.5 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)
    rgb = np.random.default_rng(0).uniform(size=(1, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        imagenet_preprocess(rgb),
        (rgb - data.IMAGENET_MEAN) / np.array(data.IMAGENET_STD),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="images"):
        imagenet_preprocess(np.zeros((2, 8, 8, 2)))


def test_resize_images_bilinear():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 6, 6, 1)).astype(np.float32)
    y = resize_images(x, 12)
    assert y.shape == (3, 12, 12, 1)
    # half-pixel bilinear upsampling by 2: an interior output pixel mixes 2x2 inputs 9:3:3:1
    i, j = 5, 7  # output (5, 7) sits at input (2.25, 3.25)
    expected = (9 * x[:, 2, 3] + 3 * x[:, 2, 4] + 3 * x[:, 3, 3] + 1 * x[:, 3, 4]) / 16
    np.testing.assert_allclose(y[:, i, j], expected, rtol=1e-5)
    np.testing.assert_array_equal(resize_images(x, 6), x)
    np.testing.assert_allclose(resize_images(np.ones((2, 28, 28, 1)), 9), 1.0, rtol=1e-6)


def test_iterate_batches():
    x = np.arange(10) * 10
    y = np.arange(10)
    batches = list(iterate_batches(x, y, batch_size=4, seed=0))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = np.concatenate([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for bx, by in batches:
        np.testing.assert_array_equal(bx, by * 10)
    again = np.concatenate([b[1] for b in iterate_batches(x, y, batch_size=4, seed=0)])
    np.testing.assert_array_equal(seen, again)
    other_epoch = np.concatenate(
        [b[1] for b in iterate_batches(x, y, batch_size=4, seed=0, epoch=1)]
    )
    assert not np.array_equal(seen, other_epoch)
    dropped = list(iterate_batches(x, batch_size=4, seed=0, drop_last=True))
    assert [len(b[0]) for b in dropped] == [4, 4]
    ordered = [b[0].tolist() for b in iterate_batches(y, batch_size=3, seed=None)]
    assert ordered == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(x, batch_size=0, seed=0))
    with pytest.raises(ValueError, match="equal lengths"):
        next(iterate_batches(x, y[:3], batch_size=2, seed=0))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(data, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 8
