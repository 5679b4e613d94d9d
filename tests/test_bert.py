"""Tests for hessjax.models.bert: the encoder against a float64 numpy BERT written here and
against golden values of Hugging Face's BertModel (tests/golden/make_bert_golden.py), the
tokenizer against HF's ids, weight loading (any BERT folder, one error listing every
mismatch), the classifier, and the library's partition / radii / projection / measures on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hessjax.models import (
    BertClassifier,
    BertConfig,
    BertModel,
    bert_classifier,
    bert_layer_depth,
    bert_measured_layer,
    bert_tokenizer,
    load_bert_state_dict,
    minilm_path,
    pretrained_bert,
    to_hf_state_dict,
)

safetensors_numpy = pytest.importorskip("safetensors.numpy")
GOLDEN = np.load(Path(__file__).parent / "golden" / "minilm_golden.npz")


def _rel(a, b) -> float:
    """max |a - b| / max |b| (a normwise-max relative error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ the numpy reference
def _erf(x):
    try:
        from scipy.special import erf

        return erf(x)
    except ImportError:  # pragma: no cover
        return np.vectorize(math.erf)(x)


def _np_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert(sd: dict, cfg: dict, ids, mask, types):
    """BERT's forward pass in float64 numpy from a HF state dict and config.json (dicts)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    assert cfg["hidden_act"] == "gelu"
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    ln = lambda x, p: _np_layer_norm(x, sd[p + ".weight"], sd[p + ".bias"], eps)
    b, s = ids.shape
    x = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][np.arange(s)][None]
        + sd["embeddings.token_type_embeddings.weight"][types]
    )
    x = ln(x, "embeddings.LayerNorm")
    d = x.shape[-1] // heads
    neg = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda t: t.reshape(b, s, heads, d).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + neg
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, heads * d)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    pooled = np.tanh(lin(x[:, 0], "pooler.dense")) if "pooler.dense.weight" in sd else None
    return x, pooled


@pytest.fixture(scope="module")
def minilm_files():
    folder = minilm_path()
    sd = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    return sd, cfg


@pytest.fixture(scope="module")
def golden_inputs():
    return GOLDEN["input_ids"], GOLDEN["attention_mask"], GOLDEN["token_type_ids"]


@pytest.fixture(scope="module")
def numpy_hidden(minilm_files, golden_inputs):
    return numpy_bert(*minilm_files, *golden_inputs)


# ------------------------------------------------------------------ encoder vs references
@pytest.mark.parametrize("jit", [False, True])
def test_encoder_float32_matches_numpy_float64(numpy_hidden, golden_inputs, jit):
    enc = pretrained_bert()
    enc.eval()
    fn = nnx.jit(lambda m, *a: m(*a)) if jit else (lambda m, *a: m(*a))
    h = np.asarray(fn(enc, *map(jnp.asarray, golden_inputs)))
    ref, _ = numpy_hidden
    assert h.dtype == np.float32 and h.shape == ref.shape == (5, 32, 384)
    err = _rel(h, ref)
    print(f"float32 vs numpy float64: max rel error {err:.2e}")
    assert err <= 1e-4


def test_encoder_float64_matches_numpy_float64(numpy_hidden, golden_inputs):
    with jax.enable_x64(True):
        enc = pretrained_bert(dtype=jnp.float64)
        h = np.asarray(enc(*map(jnp.asarray, golden_inputs)))
        pooled = np.asarray(enc.pooler(jnp.asarray(h)))
    ref, ref_pooled = numpy_hidden
    assert h.dtype == np.float64
    err = _rel(h, ref)
    print(f"float64 vs numpy float64: max rel error {err:.2e}")
    assert err <= 1e-10
    assert _rel(pooled, ref_pooled) <= 1e-10


def test_numpy_reference_matches_hf_golden(numpy_hidden):
    ref, pooled = numpy_hidden
    assert _rel(ref[:, :8], GOLDEN["hidden_head"]) <= 1e-6
    assert _rel(pooled, GOLDEN["pooler_output"]) <= 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_encoder_matches_hf_golden(golden_inputs, dtype):
    f64 = dtype == "float64"
    with jax.enable_x64(f64):
        enc = pretrained_bert(dtype=jnp.float64 if f64 else jnp.float32)
        ids, mask, types = map(jnp.asarray, golden_inputs)
        h = np.asarray(enc(ids, mask, types), np.float64)
        pooled = np.asarray(enc.pooler(jnp.asarray(h, enc.pooler.dense.kernel.dtype)))
    tol = 1e-6 if f64 else 1e-4  # goldens are stored in float32 (7 digits)
    m = np.asarray(golden_inputs[1], np.float64)[..., None]
    errs = {
        "hidden_head": _rel(h[:, :8], GOLDEN["hidden_head"]),
        "mean_pooled": _rel((h * m).sum(1) / m.sum(1), GOLDEN["mean_pooled"]),
        "pooler_output": _rel(pooled, GOLDEN["pooler_output"]),
    }
    print(f"{dtype} vs HF golden:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= tol
    masked = h[np.asarray(golden_inputs[1]) > 0]
    np.testing.assert_allclose(masked.mean(), GOLDEN["hidden_mean"], atol=1e-5)
    np.testing.assert_allclose(masked.std(), GOLDEN["hidden_std"], rtol=1e-5)
    np.testing.assert_allclose(np.abs(masked).max(), GOLDEN["hidden_absmax"], rtol=1e-5)


def test_tokenizer_ids_equal_hf():
    tok = bert_tokenizer(max_length=32)
    enc = tok.encode_batch([str(s) for s in GOLDEN["sentences"]])
    np.testing.assert_array_equal([e.ids for e in enc], GOLDEN["input_ids"])
    np.testing.assert_array_equal([e.attention_mask for e in enc], GOLDEN["attention_mask"])
    np.testing.assert_array_equal([e.type_ids for e in enc], GOLDEN["token_type_ids"])
    assert all(len(e.ids) == 32 for e in enc)  # the long review is truncated to 32


def test_tokenizer_bad_max_length():
    with pytest.raises(ValueError, match="max_length"):
        bert_tokenizer(max_length=1)


# ------------------------------------------------------------------ any BERT folder
TINY = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=16, layer_norm_eps=1e-7)  # fmt: skip


def _tiny_folder(tmp_path, transform=lambda sd: sd, seed=0):
    cfg = BertConfig(**TINY)
    model = BertModel(cfg, rngs=nnx.Rngs(seed))
    sd = transform(to_hf_state_dict(model))
    safetensors_numpy.save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="bert")))
    return model


def _tiny_inputs():
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 3, 3, 4, 2]], np.int32)
    return ids, (ids > 0).astype(np.int32), np.array([[0] * 6, [0, 0, 0, 1, 1, 1]], np.int32)


def test_tiny_folder_round_trip_and_numpy(tmp_path):
    model = _tiny_folder(tmp_path)
    loaded = pretrained_bert(tmp_path)
    x = _tiny_inputs()
    np.testing.assert_array_equal(np.asarray(loaded(*x)), np.asarray(model(*x)))
    ref, _ = numpy_bert(to_hf_state_dict(model), dict(TINY, hidden_act="gelu"), *x)
    assert _rel(loaded(*x), ref) <= 1e-5


def test_old_names_and_bert_prefix_load(tmp_path):
    def rename(sd):
        out = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}  # fmt: skip
        out["cls.predictions.bias"] = np.zeros(40, np.float32)
        out["bert.embeddings.position_ids"] = np.arange(16)[None]
        return out

    model = _tiny_folder(tmp_path, rename)
    x = _tiny_inputs()
    np.testing.assert_array_equal(np.asarray(pretrained_bert(tmp_path)(*x)), np.asarray(model(*x)))


def test_mismatched_keys_listed_in_one_error(tmp_path):
    def damage(sd):
        sd.pop("encoder.layer.1.output.dense.bias")
        sd["encoder.layer.0.attention.self.query.weight"] = np.zeros((8, 9), np.float32)
        sd["encoder.layer.2.output.dense.bias"] = np.zeros(8, np.float32)
        return sd

    _tiny_folder(tmp_path, damage)
    with pytest.raises(ValueError) as e:
        pretrained_bert(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): encoder.layer.1.output.dense.bias" in msg
    assert "unexpected keys (1): encoder.layer.2.output.dense.bias" in msg
    assert "mis-shaped tensors (1): encoder.layer.0.attention.self.query.weight (8, 9)" in msg


def test_bad_config_and_inputs(tmp_path):
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="tanh")
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_dict({"model_type": "roberta"})
    with pytest.raises(FileNotFoundError, match="path"):
        pretrained_bert(tmp_path / "nowhere")
    enc = BertModel(BertConfig(**TINY), rngs=nnx.Rngs(0))
    ids, mask, types = _tiny_inputs()
    with pytest.raises(ValueError, match="input_ids"):
        enc(ids.astype(np.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        enc(ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids: 20 tokens"):
        enc(np.ones((1, 20), np.int32))
    with pytest.raises(ValueError, match="pooling"):
        BertClassifier(enc, 2, pooling="max", rngs=nnx.Rngs(0))
    clf = BertClassifier(enc, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x: expected integer"):
        clf(np.stack([ids, mask], 1))


# ------------------------------------------------------------------ classifier
def test_classifier_pooling_head_and_dropout():
    enc = BertModel(BertConfig(**TINY), pooler=True, rngs=nnx.Rngs(1))
    ids, mask, types = _tiny_inputs()
    x = jnp.asarray(np.stack([ids, mask, types], 1))
    h = np.asarray(enc(ids, mask, types), np.float64)
    clf = BertClassifier(enc, 3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(clf(x)), 0.0)  # zero head
    m = mask[..., None].astype(np.float64)
    np.testing.assert_allclose(clf.features(x), (h * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)
    cls = BertClassifier(enc, 3, pooling="cls", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(cls.features(x), np.tanh(h[:, 0] @ np.asarray(
        enc.pooler.dense.kernel[...]) + np.asarray(enc.pooler.dense.bias[...])), rtol=1e-5, atol=1e-6)  # fmt: skip
    assert np.isfinite(np.asarray(clf(jnp.zeros((1, 3, 6), jnp.int32)))).all()  # padded row
    clf.train()
    a = clf.features(x, rngs=nnx.Rngs(dropout=0))
    b = clf.features(x, rngs=nnx.Rngs(dropout=1))
    clf.eval()
    assert not np.allclose(a, b) and np.allclose(clf.features(x), clf.features(x))


def test_bert_classifier_random_vs_pretrained():
    pre, rnd = bert_classifier(2), bert_classifier(2, pretrained=False, seed=0)
    sd = load_bert_state_dict()
    q = "encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(pre.bert.encoder.layer[0].attention.self.query.kernel[...],
                                  sd[q].T)  # fmt: skip
    assert not np.allclose(rnd.bert.encoder.layer[0].attention.self.query.kernel[...], sd[q].T)
    assert pre.bert.pooler is None  # mean pooling holds no pooler


# ------------------------------------------------------------------ the library on BERT
def _tiny_classifier(seed=0):
    enc = BertModel(BertConfig(**TINY), pooler=False, rngs=nnx.Rngs(seed))
    return BertClassifier(enc, 2, rngs=nnx.Rngs(0))


def test_partition_depth_and_radii():
    from hessjax import layer_partition, layerwise_radii
    from hessjax.models import default_depth

    params = nnx.to_pure_dict(nnx.state(bert_classifier(2), nnx.Param))
    part = layer_partition(params, select=lambda n, leaf: bert_measured_layer(n))
    assert part.num_layers == 6 * 6 + 1
    default = layer_partition(params, select=lambda n, leaf: leaf.ndim >= 2 and "kernel" in n)
    assert default.names == part.names  # load_run's default ("all kernels") is the same set
    assert not any("embedding" in n or "LayerNorm" in n for n in part.names)
    radii = layerwise_radii(params, 1.0, scale_factor=2.0, depth_fn=default_depth,
                            head_radius=5.0)  # fmt: skip
    assert radii["bert"]["encoder"]["layer"][3]["intermediate"]["dense"]["kernel"] == 8.0
    assert radii["bert"]["encoder"]["layer"][0]["attention"]["self"]["key"]["kernel"] == 1.0
    assert radii["bert"]["embeddings"]["word_embeddings"]["embedding"] is None
    assert radii["bert"]["encoder"]["layer"][1]["output"]["LayerNorm"]["scale"] is None
    assert radii["classifier"]["kernel"] == 5.0
    assert bert_layer_depth("bert/encoder/layer/5/output/dense/bias") is None


def test_project_to_anchor_on_bert():
    from hessjax import layerwise_radii, project_to_anchor
    from hessjax.models import default_depth

    params = nnx.to_pure_dict(nnx.state(_tiny_classifier(), nnx.Param))
    radii = layerwise_radii(params, 0.1, scale_factor=2.0, depth_fn=default_depth,
                            head_radius=0.2)  # fmt: skip
    tx = optax.chain(optax.sgd(1.0), project_to_anchor(radii))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    moved = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b)), new, params)
    layer1 = moved["bert"]["encoder"]["layer"][1]
    assert layer1["attention"]["self"]["query"]["kernel"] == pytest.approx(0.2, rel=1e-5)
    assert moved["classifier"]["kernel"] == pytest.approx(0.2, rel=1e-5)
    assert moved["bert"]["embeddings"]["word_embeddings"]["embedding"] > 1.0  # free


@pytest.mark.slow
def test_hessian_distance_on_text_model():
    from hessjax import hessian_distance, layer_partition
    from hessjax.train import cross_entropy

    model = _tiny_classifier()
    gdef, state = nnx.split(model)
    anchor = nnx.to_pure_dict(state)
    params = jax.tree.map(lambda a: a + 0.05 * jnp.sign(jnp.sin(jnp.arange(a.size))).reshape(
        a.shape) if jnp.issubdtype(a.dtype, jnp.floating) else a, anchor)  # fmt: skip

    def loss_fn(p, ex):
        s = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(s, p)
        return cross_entropy(nnx.merge(gdef, s)(ex[0][None]), ex[1][None])[0]

    ids, mask, types = _tiny_inputs()
    examples = (jnp.asarray(np.stack([ids, mask, types], 1)), jnp.array([0, 1]))
    few = ("bert/encoder/layer/0/attention/self/query/kernel",
           "bert/encoder/layer/1/output/dense/kernel", "classifier/kernel")  # fmt: skip
    part = layer_partition(params, select=lambda n, leaf: n in few)
    assert all(bert_measured_layer(n) for n in part.names)
    out = {}
    for variant in ("canonical", "reference"):
        hd = hessian_distance(loss_fn, params, anchor, examples, n=10, partition=part,
                              num_iters=4, variant=variant)  # fmt: skip
        out[variant] = float(hd.measure)
        assert np.isfinite(out[variant])
    assert out["canonical"] > 0
    # the per-example quadratic form of the head alone, against jax.hessian
    head = layer_partition(params, select=lambda n, leaf: n == "classifier/kernel")
    hd = hessian_distance(loss_fn, params, anchor, examples, n=1, partition=head,
                          num_iters=16)  # fmt: skip
    v = params["classifier"]["kernel"] - anchor["classifier"]["kernel"]

    def head_loss(w, ex):
        p = dict(params, classifier=dict(params["classifier"], kernel=w))
        return loss_fn(p, ex)

    forms = []
    for i in range(2):
        ex = (examples[0][i], examples[1][i])
        hmat = jax.hessian(head_loss)(params["classifier"]["kernel"], ex).reshape(v.size, v.size)
        evals, evecs = np.linalg.eigh(np.asarray(hmat, np.float64))
        hplus = (evecs * np.maximum(evals, 0)) @ evecs.T
        forms.append(float(v.ravel() @ hplus @ v.ravel()))
    np.testing.assert_allclose(float(hd.measure), math.sqrt(max(forms)), rtol=1e-3)


def test_forward_is_not_retraced():
    model = _tiny_classifier()
    gdef, state = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(state, x):
        return nnx.merge(gdef, state)(x)

    x = np.stack(_tiny_inputs(), 1)
    f(state, x)
    f(state, x + 0)
