"""Tests for hessjax.models and hessjax._torch_pickle: file formats, safety, weight mapping, and
numpy re-implementations of the loaded networks (no shared code path with flax)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import Counter, OrderedDict

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from hessjax import _torch_pickle as tp
from hessjax.models import (
    MobileNetV2,
    ResNet,
    load_state_dict,
    load_torch_weights,
    mobilenet_v2_weights_path,
    pretrained_mobilenet_v2,
    pretrained_resnet,
    save_state_dict,
    to_torch_state_dict,
)
from hessjax.models.weights import _torch_entries


@pytest.fixture(scope="module")
def mobilenet_sd():
    return load_state_dict(mobilenet_v2_weights_path())


@pytest.fixture(scope="module")
def mobilenet():
    return pretrained_mobilenet_v2()


# One jitted forward for every test: compiled once per model structure and input shape.
features_and_logits = nnx.jit(lambda model, x: (model.embed(x), model(x)))


def logits_fn(model, x):
    return features_and_logits(model, x)[1]


def random_model(build, seed):
    """A model built abstractly and filled with seeded numpy draws (no per-shape compiles)."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.get_value().shape
        if path[-1] == "var":
            value = rng.uniform(0.5, 2.0, shape)
        elif path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            value = rng.normal(0.0, 0.2, shape) + (1.0 if path[-1] == "scale" else 0.0)
        variable.set_value(jnp.asarray(value, jnp.float32))
    return model


# ---------------------------------------------------------------------------------------------
# torch.save files


def test_reads_torchvision_mobilenet_v2_file(mobilenet_sd):
    sd = mobilenet_sd
    assert len(sd) == 314
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    assert sd["features.0.1.num_batches_tracked"].dtype == np.int64
    assert sd["features.0.1.num_batches_tracked"].shape == ()
    n_params = sum(
        v.size
        for k, v in sd.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n_params == 3_504_872  # torchvision's documented count
    assert all(np.isfinite(v).all() for v in sd.values())
    assert (sd["features.0.1.running_var"] > 0).all()


def _fixture_arrays():
    rng = np.random.default_rng(0)
    return OrderedDict(
        conv=rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
        transposed=rng.normal(size=(3, 5)).astype(np.float32).T,  # non-contiguous input
        f64=rng.normal(size=7),
        f16=rng.normal(size=(2, 2)).astype(np.float16),
        bf16=rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
        count=np.array(12345678901, np.int64),
        i32=np.arange(-3, 3, dtype=np.int32),
        flags=np.array([True, False, True]),
        u8=np.arange(250, 256, dtype=np.uint8),
        empty=np.zeros((0, 3), np.float32),
    )


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_torch_file_roundtrip(tmp_path, legacy):
    arrays = _fixture_arrays()
    path = tmp_path / "w.pth"
    tp.write_torch_file(path, arrays, legacy=legacy)
    assert zipfile.is_zipfile(path) is not legacy
    back = tp.read_torch_file(path)
    assert list(back) == list(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype, k
        assert back[k].shape == a.shape, k
        np.testing.assert_array_equal(back[k], a)


def _legacy_file(body: bytes, keys: list[str], storages: list[np.ndarray]) -> bytes:
    """A legacy torch.save stream around a hand-written object pickle."""
    out = io.BytesIO()
    for obj in (tp.MAGIC_NUMBER, tp.PROTOCOL_VERSION, {"little_endian": True}):
        out.write(pickle.dumps(obj, protocol=2))
    out.write(body)
    out.write(pickle.dumps(keys, protocol=2))
    for s in storages:
        out.write(struct.pack("<q", s.size) + s.tobytes())
    return out.getvalue()


def _tensor(storage_key: str, numel: int, offset: int, size, stride) -> bytes:
    pid = b"(" + tp._unicode("storage") + b"ctorch\nFloatStorage\n" + tp._unicode(storage_key)
    pid += tp._unicode("cpu") + tp._int(numel) + b"Nt"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + b"Q"
        + tp._int(offset)
        + tp._int_tuple(size)
        + tp._int_tuple(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def test_shared_storage_offsets_and_strides(tmp_path):
    base = np.arange(12, dtype=np.float32) * 1.5
    body = b"\x80\x02ccollections\nOrderedDict\n)R("
    body += tp._unicode("strided") + _tensor("s0", 12, 2, (2, 3), (1, 2))
    body += tp._unicode("whole") + _tensor("s0", 12, 0, (3, 4), (4, 1))
    body += b"u."
    path = tmp_path / "views.pth"
    path.write_bytes(_legacy_file(body, ["s0"], [base]))
    sd = tp.read_torch_file(path)
    expected = np.array([[base[2 + i + 2 * j] for j in range(3)] for i in range(2)])
    np.testing.assert_array_equal(sd["strided"], expected)
    np.testing.assert_array_equal(sd["whole"], base.reshape(3, 4))
    sd["whole"][0, 0] = -1.0  # results are independent copies
    assert sd["strided"][0, 0] == base[2]


def test_out_of_bounds_tensor_is_rejected(tmp_path):
    body = b"\x80\x02ccollections\nOrderedDict\n)R(" + tp._unicode("x")
    body += _tensor("s0", 4, 2, (2, 2), (2, 1)) + b"u."  # last element at 2 + 2 + 1 = 5 >= 4
    path = tmp_path / "oob.pth"
    path.write_bytes(_legacy_file(body, ["s0"], [np.zeros(4, np.float32)]))
    with pytest.raises(pickle.UnpicklingError, match="past its storage"):
        tp.read_torch_file(path)


def test_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "t.pth"
    tp.write_torch_file(path, {"w": np.ones((10, 10), np.float32)}, legacy=True)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        tp.read_torch_file(path)
    path.write_bytes(b"\x80\x02K\x07.")  # a pickle, but not a torch file
    with pytest.raises(ValueError, match="magic number"):
        tp.read_torch_file(path)


def _evil_pickle(marker) -> bytes:
    command = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."


@pytest.mark.parametrize("where", ["object", "magic", "zip"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = _evil_pickle(marker)
    path = tmp_path / "evil.pth"
    if where == "object":
        path.write_bytes(_legacy_file(evil, [], []))
    elif where == "magic":
        path.write_bytes(evil)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", evil)
    with pytest.raises(tp.UnsafePickleError, match=r"os\.system"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [(Counter(a=1), "collections.Counter"), (eval, "eval"), (np.ones(2), "numpy")],
)
def test_unpickler_allows_only_tensor_globals(tmp_path, obj, name):
    path = tmp_path / "other.pth"
    path.write_bytes(_legacy_file(pickle.dumps(obj, protocol=2), [], []))
    with pytest.raises(tp.UnsafePickleError, match=name):
        tp.read_torch_file(path)


# ---------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_roundtrip_and_format(tmp_path):
    arrays = {k: v for k, v in _fixture_arrays().items()}
    path = tmp_path / "w.safetensors"
    save_state_dict(path, arrays)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    assert header["bf16"]["dtype"] == "BF16" and header["count"]["shape"] == []
    begin, end = header["conv"]["data_offsets"]
    np.testing.assert_array_equal(
        np.frombuffer(raw[8 + n + begin : 8 + n + end], "<f4").reshape(4, 3, 2, 2),
        arrays["conv"],
    )
    back = load_state_dict(path)
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape, k
        np.testing.assert_array_equal(back[k], a)


def test_safetensors_bad_offsets(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_state_dict(path, {"a": np.ones(4, np.float32)})
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["a"]["data_offsets"] = [0, 64]
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(raw[8 + n :]))
    with pytest.raises(ValueError, match="data_offsets"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------------
# Weight mapping


@pytest.mark.parametrize("fmt", ["safetensors", "legacy", "zip"])
def test_resnet18_state_dict_roundtrip(tmp_path, fmt):
    model = random_model(lambda: ResNet(18, 10, rngs=nnx.Rngs(0)), seed=1)
    sd = to_torch_state_dict(model)
    assert len(sd) == 122  # torchvision resnet18's state dict, num_batches_tracked included
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.bn2.running_var"].shape == (512,)
    assert sd["fc.weight"].shape == (10, 512)
    path = tmp_path / ("r18.safetensors" if fmt == "safetensors" else "r18.pth")
    save_state_dict(path, sd, legacy=fmt == "legacy")
    x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
    loaded = pretrained_resnet(18, path)
    expected = logits_fn(model, x)
    np.testing.assert_allclose(logits_fn(loaded, x), expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(expected).max()) > 1e-2  # the comparison is not vacuous
    fresh = random_model(lambda: ResNet(18, 10, rngs=nnx.Rngs(0)), seed=2)
    assert not np.allclose(logits_fn(fresh, x), expected, atol=1e-2)
    new_head = pretrained_resnet(18, path, num_classes=5)
    assert new_head.fc.kernel.get_value().shape == (512, 5)
    assert not np.any(new_head.fc.kernel.get_value()) and not np.any(new_head.fc.bias.get_value())
    body = {k: v for k, v in to_torch_state_dict(new_head).items() if not k.startswith("fc.")}
    for k, v in body.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_resnet50_matches_torchvision_layout():
    model = nnx.eval_shape(lambda: ResNet(50, 1000, rngs=nnx.Rngs(0)))
    entries = _torch_entries(model)
    n_bn = sum(k.endswith("running_var") for k in entries)
    assert len(entries) + n_bn == 320  # torchvision resnet50 state-dict length
    n_params = sum(
        int(np.prod(v.get_value().shape))
        for k, (v, _) in entries.items()
        if not k.endswith(("running_mean", "running_var"))
    )
    assert n_params == 25_557_032
    kernel, kind = entries["layer3.0.conv2.weight"]  # v1.5: stride on the 3x3 conv
    assert kind == "conv" and kernel.get_value().shape == (3, 3, 256, 256)
    assert model.layer3[0].conv2.strides in (2, (2, 2))
    assert entries["layer1.0.downsample.0.weight"][0].get_value().shape == (1, 1, 64, 256)


def test_mismatched_state_dict_lists_every_problem(mobilenet_sd):
    model = pretrained_mobilenet_v2()
    before = np.asarray(model.features[0][0].kernel.get_value())
    sd = dict(mobilenet_sd)
    sd["features.0.0.weight"] = sd["features.0.0.weight"] + 1.0
    del sd["features.5.conv.1.1.running_var"]
    sd["features.19.0.weight"] = np.zeros(3, np.float32)
    sd["features.2.conv.2.weight"] = sd["features.2.conv.2.weight"][:, :10]
    with pytest.raises(ValueError) as info:
        load_torch_weights(model, sd)
    message = str(info.value)
    assert "missing keys (1): features.5.conv.1.1.running_var" in message
    assert "unexpected keys (1): features.19.0.weight" in message
    assert "features.2.conv.2.weight (24, 10, 1, 1) (expected (24, 96, 1, 1))" in message
    np.testing.assert_array_equal(model.features[0][0].kernel.get_value(), before)


def test_skip_keeps_new_head(mobilenet_sd):
    model = pretrained_mobilenet_v2(7)
    head = model.classifier[1]
    assert head.kernel.get_value().shape == (1280, 7)
    assert not np.any(head.kernel.get_value()) and not np.any(head.bias.get_value())
    features = jax.random.normal(jax.random.key(0), (2, 1280))
    np.testing.assert_array_equal(head(features), np.zeros((2, 7)))
    with pytest.raises(ValueError, match="classifier.1.weight"):
        load_torch_weights(model, mobilenet_sd)  # the 1000-class head does not fit


def test_paths_mirror_torchvision_names(mobilenet, mobilenet_sd):
    flat = dict(nnx.to_flat_state(nnx.state(mobilenet)))
    kernel = flat[("features", 3, "conv", 1, 0, "kernel")].get_value()
    assert kernel.shape == (3, 3, 1, 144)  # depthwise (kh, kw, in/groups, out)
    np.testing.assert_array_equal(
        kernel, mobilenet_sd["features.3.conv.1.0.weight"].transpose(2, 3, 1, 0)
    )
    names = {".".join(map(str, p[:-1])) for p in flat}
    torch_modules = {k.rsplit(".", 1)[0] for k in mobilenet_sd}
    assert names == torch_modules
    assert mobilenet.head_path == ("classifier", 1)
    np.testing.assert_array_equal(
        to_torch_state_dict(mobilenet)["classifier.1.weight"], mobilenet_sd["classifier.1.weight"]
    )


# ---------------------------------------------------------------------------------------------
# numpy re-implementation of the loaded network (float64, explicit loops over kernel taps)


def np_conv(x, w, stride=1, groups=1):
    """x (N, H, W, C), torch weight w (O, C/groups, kh, kw); torch's symmetric zero padding."""
    n, h, wd, c = x.shape
    o, cg, kh, kw = w.shape
    pad = (kh - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, ho, wo, o))
    for i in range(kh):
        for j in range(kw):
            patch = xp[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            if groups == 1:
                out += np.einsum("nhwc,oc->nhwo", patch, w[:, :, i, j])
            else:
                assert groups == c == o and cg == 1  # depthwise
                out += patch * w[:, 0, i, j]
    return out


def np_bn(x, sd, prefix, eps=1e-5):
    mean, var = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    return (x - mean) / np.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def np_conv_bn_relu6(x, sd, prefix, stride=1, depthwise=False):
    w = sd[prefix + ".0.weight"].astype(np.float64)
    y = np_conv(x, w, stride, groups=w.shape[0] if depthwise else 1)
    return np.clip(np_bn(y, sd, prefix + ".1"), 0.0, 6.0)


# First stride of each of the 17 inverted residual blocks (Sandler et al., Table 2).
BLOCK_STRIDES = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]


def np_mobilenet_v2(x, sd):
    x = np_conv_bn_relu6(x, sd, "features.0", stride=2)
    for b, stride in enumerate(BLOCK_STRIDES, start=1):
        p = f"features.{b}.conv"
        y, i = x, 0
        if f"{p}.3.weight" in sd:  # has the 1x1 expansion
            y, i = np_conv_bn_relu6(y, sd, f"{p}.0"), 1
        y = np_conv_bn_relu6(y, sd, f"{p}.{i}", stride=stride, depthwise=True)
        y = np_bn(np_conv(y, sd[f"{p}.{i + 1}.weight"].astype(np.float64)), sd, f"{p}.{i + 2}")
        x = x + y if (stride == 1 and x.shape == y.shape) else y
    x = np_conv_bn_relu6(x, sd, "features.18").mean(axis=(1, 2))
    return x @ sd["classifier.1.weight"].T.astype(np.float64) + sd["classifier.1.bias"]


def test_conv_bn_relu6_blocks_match_numpy(mobilenet, mobilenet_sd):
    x = 4.0 * np.asarray(jax.random.normal(jax.random.key(1), (2, 11, 11, 3)), np.float64)
    stem = mobilenet.features[0](jnp.asarray(x, jnp.float32))
    ref = np_conv_bn_relu6(x, mobilenet_sd, "features.0", stride=2)
    assert stem.shape == ref.shape == (2, 6, 6, 32)
    np.testing.assert_allclose(stem, ref, rtol=1e-4, atol=1e-4)
    assert 0 < (ref == 6.0).mean() < 0.5 and 0 < (ref == 0.0).mean() < 0.9  # clipping exercised
    # features.1: depthwise conv+BN+ReLU6, then 1x1 projection + BN
    dw = mobilenet.features[1].conv[0](stem)
    ref_dw = np_conv_bn_relu6(ref, mobilenet_sd, "features.1.conv.0", depthwise=True)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-4)
    out = mobilenet.features[1](stem)
    ref_out = np_bn(
        np_conv(ref_dw, mobilenet_sd["features.1.conv.1.weight"]), mobilenet_sd, "features.1.conv.2"
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)


def test_full_network_matches_numpy(mobilenet, mobilenet_sd):
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 32, 32, 3)), np.float64)
    logits = np.asarray(logits_fn(mobilenet, jnp.asarray(x, jnp.float32)), np.float64)
    ref = np_mobilenet_v2(x, mobilenet_sd)
    assert logits.shape == ref.shape == (2, 1000)
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_imagenet_logits_finite_and_varied(mobilenet):
    key_a, key_b = jax.random.split(jax.random.key(3))
    n = 24
    # smooth random colour fields: low-resolution noise upsampled, plus per-image colour shift
    low = jax.random.normal(key_a, (n, 6, 6, 3)) * jnp.linspace(0.2, 2.0, n)[:, None, None, None]
    x = jax.image.resize(low, (n, 32, 32, 3), "bilinear") + jax.random.normal(key_b, (n, 1, 1, 3))
    logits = jnp.concatenate([logits_fn(mobilenet, x[i : i + 2]) for i in range(0, n, 2)])
    assert logits.shape == (n, 1000) and bool(jnp.isfinite(logits).all())
    predicted = np.asarray(jnp.argmax(logits, axis=-1))
    counts = np.bincount(predicted, minlength=1000)
    assert (counts > 0).sum() >= 4 and counts.max() <= n // 2, counts[counts > 0]
    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_eval_mode_and_jit(mobilenet):
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    block = mobilenet.features[3]  # a residual block (stride 1, 24 -> 24 channels)
    assert block.use_res_connect
    h = jax.random.normal(jax.random.key(5), (3, 8, 8, 24))
    eager = block(h)
    jitted = nnx.jit(lambda b, h: b(h))(block, h)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    # running statistics: an example's output does not depend on the rest of its batch
    np.testing.assert_allclose(block(h[:1]), eager[:1], rtol=1e-5, atol=1e-5)
    embed, logits = features_and_logits(mobilenet, x)
    np.testing.assert_allclose(logits_fn(mobilenet, x[::-1]), logits[::-1], rtol=1e-4, atol=1e-4)
    assert embed.shape == (2, 1280)
    head = mobilenet.classifier[1]
    np.testing.assert_allclose(head(embed), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_random_init_follows_torchvision():
    model = MobileNetV2(10, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.features[18][0].kernel.get_value())  # (1, 1, 320, 1280)
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / 1280), rtol=0.05)
    assert not np.any(model.classifier[1].kernel.get_value())
    assert model(jnp.ones((1, 32, 32, 3))).shape == (1, 10)
    resnet = ResNet(18, 4, rngs=nnx.Rngs(1))
    assert resnet(jnp.ones((1, 32, 32, 3))).shape == (1, 4)


def test_storage_larger_than_file_is_rejected(tmp_path):
    body = b"\x80\x02ccollections\nOrderedDict\n)R(" + tp._unicode("x")
    body += _tensor("s0", 10**12, 0, (10**12,), (1,)) + b"u."
    path = tmp_path / "huge.pth"
    path.write_bytes(_legacy_file(body, ["s0"], []))
    with pytest.raises(ValueError, match="larger than the file"):
        tp.read_torch_file(path)


@pytest.mark.slow
def test_docstring_examples_run():
    import doctest

    import hessjax.models as models_pkg
    from hessjax.models import mobilenet, resnet, weights

    for module in (models_pkg, mobilenet, resnet, weights):
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__


@pytest.mark.slow
def test_linear_probe_experiment_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[2] / "experiments" / "linear_probe.py"
    spec = importlib.util.spec_from_file_location("linear_probe", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--dataset", "digits", "--n-per-class", "3", "--n-val", "20", "--n-test", "20"]
    metrics = module.main([*args, "--size", "32", "--c-grid", "1.0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_train"] == 30 and saved["resolution"] == 32
    for name in ("pretrained", "random"):
        assert 0.0 <= saved[name]["test_accuracy"] <= 1.0
    assert metrics["imagenet_head_on_test"]["logits_finite"]
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


# ---------------------------------------------------------------------------------------------
# Depthwise convolutions as shifted taps, and partial fine-tuning (first_block, trunk)


class DepthwiseConvTest(chex.TestCase):
    """DepthwiseConv against XLA's grouped convolution (lax.conv_general_dilated), a separate
    code path: outputs, gradients and jvp-of-grad products, float32 and float64, jit or not."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        *[
            (dtype, stride, size, kernel_size)
            for dtype in ("float32", "float64")
            for stride, size, kernel_size in ((1, 1, 3), (2, 2, 3), (1, 5, 3), (2, 8, 5))
        ]
    )
    def test_matches_grouped_convolution(self, dtype, stride, size, kernel_size):
        from hessjax.models._layers import DepthwiseConv, conv, depthwise_conv

        with jax.enable_x64(dtype == "float64"):
            layer = conv(6, 6, kernel_size, stride=stride, groups=6, rngs=nnx.Rngs(0))
            assert isinstance(layer, DepthwiseConv)
            pad = (kernel_size - 1) // 2
            rng = np.random.default_rng(size)
            x = jnp.asarray(rng.normal(size=(3, size, size, 6)), dtype)
            k = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 6)), dtype)
            ours = lambda k, x: depthwise_conv(x, k, (stride, stride), ((pad, pad), (pad, pad)))
            # the module computes the same with its own kernel
            np.testing.assert_array_equal(layer(x), ours(layer.kernel[...], x))

            def reference(k, x):
                return jax.lax.conv_general_dilated(
                    x, k, (stride, stride), ((pad, pad), (pad, pad)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
                    precision=jax.lax.Precision.HIGHEST,
                )  # fmt: skip

            tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
            loss = lambda f: lambda k, x: jnp.sum(jnp.tanh(f(k, x)) ** 2)
            got = self.variant(ours)(k, x)
            assert got.dtype == x.dtype
            np.testing.assert_allclose(got, reference(k, x), **tol)
            g_ours = self.variant(jax.grad(loss(ours), argnums=(0, 1)))(k, x)
            g_ref = jax.grad(loss(reference), argnums=(0, 1))(k, x)
            for a, b in zip(g_ours, g_ref, strict=True):
                np.testing.assert_allclose(a, b, **tol)
            t = jnp.asarray(rng.normal(size=k.shape), dtype)
            hvp = lambda f: lambda k: jax.jvp(jax.grad(lambda k: loss(f)(k, x)), (k,), (t,))[1]
            np.testing.assert_allclose(self.variant(hvp(ours))(k), hvp(reference)(k), **tol)

    def test_non_depthwise_groups_stay_grouped_convolutions(self):
        from hessjax.models._layers import DepthwiseConv, conv

        assert not isinstance(conv(4, 8, 3, groups=4, rngs=nnx.Rngs(0)), DepthwiseConv)
        assert not isinstance(conv(4, 8, 3, rngs=nnx.Rngs(0)), DepthwiseConv)


def _random_head(model, seed):
    kernel = model.classifier[1].kernel
    kernel[...] = jnp.asarray(np.random.default_rng(seed).normal(size=kernel.shape), jnp.float32)


@pytest.mark.parametrize(
    "first_block",
    [pytest.param(1, marks=pytest.mark.slow), 14, pytest.param(18, marks=pytest.mark.slow)],
)
def test_top_on_trunk_equals_whole_network(mobilenet_sd, first_block):
    from hessjax.models import Frozen, mobilenet_v2_trunk

    x = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
    whole = pretrained_mobilenet_v2(10)
    top = pretrained_mobilenet_v2(10, first_block=first_block)
    _random_head(whole, 1)
    _random_head(top, 1)
    feats = mobilenet_v2_trunk(x, first_block, batch_size=2)  # 2 + 2 + 1 (padded) images
    np.testing.assert_allclose(feats, mobilenet_v2_trunk(x, first_block), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits_fn(top, feats), logits_fn(whole, x), rtol=1e-4, atol=1e-4)
    # the frozen blocks are parameter-free placeholders; the rest keep names and values
    assert all(isinstance(top.features[i], Frozen) for i in range(first_block))
    whole_params = dict(nnx.to_flat_state(nnx.state(whole, nnx.Param)))
    top_params = dict(nnx.to_flat_state(nnx.state(top, nnx.Param)))
    assert top_params and all(p[0] != "features" or p[1] >= first_block for p in top_params)
    for path, variable in top_params.items():
        np.testing.assert_array_equal(variable.get_value(), whole_params[path].get_value())
    assert {p for p in whole_params if p[0] != "features" or p[1] >= first_block} == set(top_params)


def test_first_block_errors():
    from hessjax.models import make_model, mobilenet_v2_trunk

    with pytest.raises(ValueError, match="first_block"):
        MobileNetV2(10, first_block=19, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="first_block"):
        MobileNetV2(10, first_block=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="first_block"):
        mobilenet_v2_trunk(np.zeros((1, 8, 8, 3)), -1)
    with pytest.raises(ValueError, match="images"):
        mobilenet_v2_trunk(np.zeros((1, 8, 8, 1)), 3)
    with pytest.raises(ValueError, match="first_block"):
        make_model("tiny_cnn", 3, seed=0, first_block=2)
    x = np.ones((2, 8, 8, 3), np.float32)
    assert mobilenet_v2_trunk(x, 0) is not None and mobilenet_v2_trunk(x, 0).shape == x.shape
