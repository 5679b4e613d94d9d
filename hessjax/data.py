"""Datasets as numpy arrays: loading, seeded splits, small-data subsets, label noise, batches.

Sources (:func:`load_dataset`):

* ``"fashion_mnist"``: the IDX ``.gz`` files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; override with ``data_dir`` or
  ``$HESSJAX_FASHION_MNIST_DIR``), 60000 + 10000 grey 28x28 images, 10 classes;
* ``"digits"``: scikit-learn's ``load_digits`` (1797 grey 8x8 images, 10 classes, bundled
  with scikit-learn), split by order: the first 1437 are "train", the last 360 "test";
* ``"tfds:<name>"``: any tensorflow-datasets dataset prepared in ``data_dir`` (array_record
  format), read through ``tfds.data_source`` (no TensorFlow needed);
* ``"amazon_reviews"``, ``"tweet_source"`` (optionally ``":<max_length>"``): labelled text
  (:mod:`hessjax.text`) as int32 token arrays ``(n, 3, max_length)`` = ids, attention mask,
  token type ids, tokenised once and cached (``data_dir``: the cache folder).

Images are float32 NHWC in [0, 1], labels int32. :func:`load_splits` builds the experiment's
train / validation / test arrays: validation carved from train (stratified, seeded), an
optional n-per-class small-data regime, ImageNet preprocessing and noisy TRAINING labels drawn
through :func:`hessjax.noise.corrupt_labels` (validation and test labels stay clean, as in
Ju, Li & Zhang, ICML 2022, section 4).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FASHION_MNIST_ENV = "HESSJAX_FASHION_MNIST_DIR"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TRAIN_SIZE = 1437

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Splits(NamedTuple):
    """Train / validation / test arrays of one experiment.

    Attributes:
        train_images: float32 (n, H, W, C).
        train_labels: int32 (n,), the labels to train on (noisy when noise was requested).
        train_clean_labels: int32 (n,), the true training labels (for measuring the noise).
        val_images, val_labels: the clean validation set (carved from the training split).
        test_images, test_labels: the clean test set.
        num_classes: k.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    train_clean_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


# ---------------------------------------------------------------------------------------------
# Sources.


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) into a numpy array.

    Format: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions d, d
    big-endian uint32 sizes, then the data in C order, big-endian.

    Args:
        path: the file (``.gz`` or plain).

    Returns:
        The array with its stored shape and dtype (native byte order).

    Raises:
        ValueError: a malformed header or a data size that does not match it.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], ">u4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes), file has "
            f"{len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist(split: str, data_dir: str | os.PathLike | None):
    if split not in _FASHION_FILES:
        raise ValueError(f"split: expected 'train' or 'test' for fashion_mnist, got {split!r}")
    root = Path(data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    arrays = []
    for stem in _FASHION_FILES[split]:
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}(.gz) not found in {str(root)!r}. Install it with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in "
                f"{FASHION_MNIST_DIR}), or download the four IDX files from "
                "https://github.com/zalandoresearch/fashion-mnist into a folder and pass "
                f"data_dir=... or set ${FASHION_MNIST_ENV}; or use name='tfds:fashion_mnist'."
            )
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Fashion-MNIST files in {root} have shapes {images.shape}, {labels.shape}"
        )
    return (images[..., None].astype(np.float32) / 255.0, labels.astype(np.int32), 10)


def _digits(split: str):
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test' for digits, got {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[..., None] / 16.0
    labels = bunch.target.astype(np.int32)
    part = slice(None, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return images[part], labels[part], 10


def _tfds(name: str, split: str, data_dir, image_key: str, label_key: str):
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"name: no tensorflow-datasets dataset called {name!r}") from e
    except Exception as e:  # tfds raises many types: not prepared, wrong format, bad split
        message = str(e)
        if "split" in message.lower() and "unknown" in message.lower():
            raise ValueError(f"split: {split!r} is not a split of tfds:{name} ({e})") from e
        raise FileNotFoundError(
            f"tfds dataset {name!r} (split {split!r}) could not be opened from data_dir="
            f"{data_dir!r}: {type(e).__name__}: {message[:300]}. Prepare it first, in "
            f"array_record format: `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` or tfds.builder({name!r}, data_dir=DIR, file_format="
            "'array_record').download_and_prepare() (needs the internet once, and "
            "TensorFlow for some datasets)."
        ) from e
    features = source.dataset_info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"tfds:{name} has no feature {key!r}; features: {list(features)}")
    num_classes = int(features[label_key].num_classes)
    images, labels = [], []
    for i in range(len(source)):
        example = source[i]
        images.append(np.asarray(example[image_key]))
        labels.append(int(example[label_key]))
    if not images:
        raise ValueError(f"split: tfds:{name} split {split!r} is empty")
    x = np.stack(images)
    if x.ndim == 3:
        x = x[..., None]
    x = x.astype(np.float32) / (255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    return x, np.asarray(labels, np.int32), num_classes


def _load(name: str, split: str, data_dir=None, image_key="image", label_key="label"):
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if not isinstance(split, str):
        raise TypeError(f"split: expected a str, got {type(split).__name__}")
    if name == "fashion_mnist":
        return _fashion_mnist(split, data_dir)
    if name == "digits":
        return _digits(split)
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        return _tfds(name[len("tfds:") :], split, data_dir, image_key, label_key)
    from hessjax.text import is_text_dataset, load_text

    if is_text_dataset(name):
        return load_text(name, split, cache_dir=data_dir)
    raise ValueError(
        "name: expected 'fashion_mnist', 'digits' or 'tfds:<dataset>' (images), or "
        f"'amazon_reviews', 'tweet_source' (text, optionally ':<length>'), got {name!r}"
    )


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a dataset as ``(images, labels)`` numpy arrays.

    Cost: Fashion-MNIST train is 60000x28x28 float32 (188 MB), parsed in about a second; a
    tfds dataset is read example by example (about 10k examples/s).

    Args:
        name: ``"fashion_mnist"``, ``"digits"``, ``"tfds:<name>"`` (e.g. ``"tfds:mnist"``)
            or a text data set (``"amazon_reviews"``, ``"tweet_source"``, ``":<length>"``).
        split: ``"train"`` or ``"test"``; for tfds any split string it accepts
            (``"train[:10%]"``, ``"validation"``).
        data_dir: where the files are (Fashion-MNIST folder / tfds data_dir).
        image_key, label_key: the tfds feature names.

    Returns:
        ``images`` float32 (n, H, W, C) in [0, 1] (text: int32 tokens (n, 3, L)) and
        ``labels`` int32 (n,).

    Raises:
        ValueError: unknown ``name`` or ``split``.
        FileNotFoundError: the dataset is not on disk; the message says how to get it.

    Example:
        >>> images, labels = load_dataset("digits", "test")
        >>> images.shape, labels.dtype
        ((360, 8, 8, 1), dtype('int32'))
    """
    images, labels, _ = _load(name, split, data_dir, image_key, label_key)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Splitting and subsampling (numpy Generators seeded explicitly).


def _rng(seed: Any, *stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    return np.random.default_rng([int(seed), *stream])


def stratified_split(
    labels: np.ndarray, size: int | float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with the held-out part stratified by class.

    Each class c with n_c examples gives ``round(size * n_c)`` (a fraction) or its share of
    ``size`` (a count, allocated by largest remainder) to the held-out part, drawn without
    replacement; both index arrays are sorted.

    Args:
        labels: int (n,).
        size: held-out fraction in (0, 1) or count in [1, n).
        seed: the numpy seed.

    Returns:
        ``(keep, held_out)`` index arrays.

    Raises:
        ValueError: ``size`` out of range.

    Example:
        >>> keep, val = stratified_split(np.array([0, 0, 1, 1]), 0.5, seed=0)
        >>> len(keep), len(val)
        (2, 2)
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    if isinstance(size, float) and 0.0 < size < 1.0:
        take = np.round(size * counts).astype(int)
    elif isinstance(size, int | np.integer) and not isinstance(size, bool) and 0 < size < n:
        share = size * counts / n
        take = np.floor(share).astype(int)
        order = np.argsort(-(share - take), kind="stable")
        take[order[: size - take.sum()]] += 1
    else:
        raise ValueError(
            f"size: expected a fraction in (0, 1) or an integer count in [1, {n}), got {size!r}"
        )
    rng = _rng(seed, 0)
    held = [
        rng.choice(np.flatnonzero(labels == c), t, replace=False)
        for c, t in zip(classes, take, strict=True)
    ]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    keep = np.setdiff1d(np.arange(n), held_out)
    return keep, held_out


def subsample_per_class(
    labels: np.ndarray, n_per_class: int, *, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of exactly ``n_per_class`` examples of every class (the small-data regime).

    Args:
        labels: int (n,).
        n_per_class: examples per class, >= 1.
        seed: the numpy seed.
        num_classes: if given, every class in ``range(num_classes)`` must be present.

    Returns:
        Sorted index array of length ``n_per_class * (number of classes)``.

    Raises:
        ValueError: ``n_per_class`` < 1 or larger than the smallest class.

    Example:
        >>> subsample_per_class(np.array([0, 1, 0, 1, 1]), 2, seed=0).size
        4
    """
    labels = np.asarray(labels)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int | np.integer):
        raise TypeError(f"n_per_class: expected an int, got {n_per_class!r}")
    classes = np.arange(num_classes) if num_classes is not None else np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    if n_per_class < 1 or n_per_class > counts.min():
        raise ValueError(
            f"n_per_class: expected an int in [1, {counts.min()}] (the smallest class, "
            f"{classes[counts.argmin()]}, has {counts.min()} examples), got {n_per_class}"
        )
    rng = _rng(seed, 1)
    picks = [rng.choice(np.flatnonzero(labels == c), n_per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def resize_images(
    images: np.ndarray, size: int | tuple[int, int], *, chunk: int = 512
) -> np.ndarray:
    """Bilinear resize of an NHWC batch with ``jax.image.resize`` (antialiased when shrinking).

    Args:
        images: float (n, H, W, C).
        size: the new (height, width), or one int for both.
        chunk: images per ``jax.image.resize`` call (bounds memory).

    Returns:
        float32 numpy (n, size, size, C).

    Example:
        >>> resize_images(np.zeros((2, 8, 8, 1)), 16).shape
        (2, 16, 16, 1)
    """
    import jax

    height, width = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"size: expected positive sizes, got {size!r}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images: expected (n, H, W, C), got shape {images.shape}")
    if images.shape[1:3] == (height, width):
        return images
    fn = jax.jit(lambda x: jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear"))
    out = [np.asarray(fn(images[i : i + chunk])) for i in range(0, images.shape[0], chunk)]
    return np.concatenate(out) if out else np.zeros((0, height, width, images.shape[3]), np.float32)


def imagenet_preprocess(
    images: np.ndarray,
    *,
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Prepare [0, 1] images for an ImageNet-pretrained model: resize, grey -> RGB, normalise.

        x <- (resize(x) - mean_c) / std_c,  with grey images replicated to 3 channels.

    Args:
        images: float (n, H, W, 1 or 3) in [0, 1].
        size: output height and width (None keeps the size).
        mean, std: per-channel statistics (torchvision's ImageNet values by default).

    Returns:
        float32 (n, size, size, 3).

    Example:
        >>> imagenet_preprocess(np.ones((1, 8, 8, 1)), size=16).shape
        (1, 16, 16, 3)

    References:
        torchvision.transforms.Normalize with the ImageNet statistics.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected (n, H, W, 1 or 3), got shape {images.shape}")
    if size is not None:
        images = resize_images(images, size)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------
# The experiment's splits.


def load_splits(
    name: str,
    *,
    seed: int,
    val_size: int | float = 0.1,
    n_per_class: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
    imagenet: bool = False,
    transition: Any = None,
    data_dir: str | os.PathLike | None = None,
    test_split: str = "test",
) -> Splits:
    """Train / validation / test arrays with optional small-data subset and noisy labels.

    Steps, all determined by ``seed``: (1) carve a stratified validation set of ``val_size``
    from the training split; (2) keep ``n_per_class`` training examples per class (the
    small-data regime); (3) optionally subsample the test set to ``test_size`` (stratified);
    (4) resize / ImageNet-normalise; (5) if ``transition`` is given, draw noisy training
    labels ``noisy_n ~ Categorical(T[clean_n])`` with :func:`hessjax.noise.corrupt_labels`
    (key ``jax.random.key(seed)``). Validation and test labels stay clean.

    Cost: loading the split plus one resize pass over the kept images.

    Args:
        name: dataset (see :func:`load_dataset`).
        seed: seeds every random choice (numpy for the subsets, JAX for the noise).
        val_size: validation fraction in (0, 1) or count.
        n_per_class: training examples per class (None: all remaining).
        test_size: number of test examples to keep (None: all).
        image_size: resize to this height and width.
        imagenet: replicate grey to 3 channels and apply the ImageNet mean/std.
        transition: (k, k) matrix T[i, j] = P(noisy j | clean i), e.g.
            ``hessjax.symmetric_transition(0.4, num_classes=10)``; None for clean labels; or
            a function of the number of classes ``k`` returning T or None, for callers that
            learn ``k`` from the data set itself.
        data_dir: where the dataset is.
        test_split: the split used as the test set.

    Returns:
        A :class:`Splits`.

    Raises:
        ValueError: bad ``name``, ``split``, sizes, or a transition of the wrong size.

    Example:
        >>> s = load_splits("digits", seed=0, val_size=100, n_per_class=20)
        >>> s.train_images.shape, s.val_images.shape[0], s.num_classes
        ((200, 8, 8, 1), 100, 10)

    References:
        Ju, Li & Zhang, ICML 2022, section 4 (noisy training labels, clean validation).
    """
    images, labels, num_classes = _load(name, "train", data_dir)
    test_images, test_labels, _ = _load(name, test_split, data_dir)
    keep, val = stratified_split(labels, val_size, seed=seed)
    if n_per_class is not None:
        keep = keep[
            subsample_per_class(labels[keep], n_per_class, seed=seed, num_classes=num_classes)
        ]
    if test_size is not None:
        if isinstance(test_size, bool) or not isinstance(test_size, int | np.integer):
            raise TypeError(f"test_size: expected an int or None, got {test_size!r}")
        if not 0 < test_size <= test_labels.shape[0]:
            raise ValueError(
                f"test_size: expected an int in [1, {test_labels.shape[0]}], got {test_size}"
            )
        if test_size < test_labels.shape[0]:
            _, part = stratified_split(test_labels, int(test_size), seed=seed + 1)
            test_images, test_labels = test_images[part], test_labels[part]

    def prepare(x):
        if np.issubdtype(x.dtype, np.integer):  # token ids (text): nothing to resize
            if imagenet:
                raise ValueError(f"imagenet: {name!r} is a text data set, not images")
            return x
        if imagenet:
            return imagenet_preprocess(x, size=image_size)
        return resize_images(x, image_size) if image_size is not None else x

    train_clean = labels[keep]
    train_labels = train_clean
    if callable(transition):
        transition = transition(num_classes)
    if transition is not None:
        import jax

        from hessjax.noise import corrupt_labels, validate_transition

        validate_transition(transition, num_classes=num_classes)
        key = jax.random.key(seed)
        train_labels = np.asarray(corrupt_labels(key, train_clean, transition), np.int32)
    return Splits(
        train_images=prepare(images[keep]),
        train_labels=train_labels,
        train_clean_labels=train_clean,
        val_images=prepare(images[val]),
        val_labels=labels[val],
        test_images=prepare(test_images),
        test_labels=test_labels,
        num_classes=num_classes,
    )


def iterate_batches(
    *arrays: np.ndarray,
    batch_size: int,
    seed: int | None,
    epoch: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield aligned mini-batches of ``arrays``, shuffled by ``(seed, epoch)``.

    Args:
        *arrays: arrays with the same leading size n.
        batch_size: examples per batch, >= 1.
        seed: shuffling seed; None keeps the order (for evaluation).
        epoch: mixed into the seed so each epoch has its own order.
        drop_last: drop a final batch smaller than ``batch_size``.

    Yields:
        Tuples of array slices, one per input array.

    Raises:
        ValueError: no arrays, different lengths, or ``batch_size`` < 1.

    Example:
        >>> x, y = np.arange(10), np.arange(10)
        >>> [len(b[0]) for b in iterate_batches(x, y, batch_size=4, seed=0)]
        [4, 4, 2]
    """
    if not arrays:
        raise ValueError("arrays: expected at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays: expected equal lengths, got {[len(a) for a in arrays]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    order = np.arange(n) if seed is None else _rng(seed, 2, epoch).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield tuple(a[idx] for a in arrays)
