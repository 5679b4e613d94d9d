"""Tests of hessjax.sharding: single-device API checks here, multi-device equivalence in a
subprocess with 4 simulated CPU devices (tests/_sharding_checks.py), so that the rest of the
suite keeps one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessjax import cli
from hessjax.experiment import data_mesh
from hessjax.sharding import (
    fsdp_sharding,
    initialize_distributed,
    make_mesh,
    mesh_map,
    mesh_size,
    replicate,
    shard_batch,
    sharded_map,
)

HERE = Path(__file__).parent


# ------------------------------------------------------------------- one device, fast
def test_make_mesh_one_device():
    mesh = make_mesh(1)
    assert mesh.axis_names == ("data",) and mesh_size(mesh) == 1
    assert mesh_size(make_mesh()) == jax.device_count()
    assert make_mesh([jax.devices()[0]], axis_name="batch").axis_names == ("batch",)


@pytest.mark.parametrize("devices", [0, -1, 10_000])
def test_make_mesh_bad_count_names_devices(devices):
    with pytest.raises(ValueError, match="devices"):
        make_mesh(devices)


def test_make_mesh_bad_inputs():
    with pytest.raises(ValueError, match="devices"):
        make_mesh([])
    with pytest.raises(TypeError, match="devices"):
        make_mesh("two")
    with pytest.raises(ValueError, match="axis_name"):
        make_mesh(1, axis_name="")


def test_shard_batch_pads_and_masks():
    mesh = make_mesh(1)
    batch = {"x": np.arange(6.0).reshape(3, 2), "y": np.arange(3)}
    placed, mask = shard_batch(batch, mesh)
    np.testing.assert_array_equal(placed["x"], batch["x"])
    assert mask.dtype == jnp.bool_ and mask.tolist() == [True] * 3
    assert placed["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="leading size"):
        shard_batch({"x": np.ones((3, 2)), "y": np.ones(2)}, mesh)
    with pytest.raises(ValueError, match="axis_name"):
        shard_batch(batch, mesh, axis_name="model")


def test_pad_rows_repeats_the_last_row():
    from hessjax.sharding import _pad_rows

    padded, m, total = _pad_rows(np.arange(5.0), 4)
    assert (m, total) == (5, 8) and padded.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    padded, m, total = jax.jit(lambda x: _pad_rows(x, 3)[0])(jnp.arange(4.0)), 4, 6
    assert padded.tolist() == [0, 1, 2, 3, 3, 3]


def test_replicate_and_fsdp_one_device():
    mesh = make_mesh(1)
    tree = replicate({"w": jnp.ones((2, 3))}, mesh)
    assert tree["w"].sharding.spec == jax.sharding.PartitionSpec()
    s = fsdp_sharding({"big": jnp.ones((4, 8)), "small": jnp.ones(3)}, mesh, min_size=10)
    assert s["big"].spec == jax.sharding.PartitionSpec(None, "data")
    assert s["small"].spec == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="min_size"):
        fsdp_sharding({"w": jnp.ones(2)}, mesh, min_size=0)


@pytest.mark.parametrize("jit", [False, True])
def test_sharded_map_equals_chunked_vmap(jit):
    from hessjax.mapping import chunked_vmap

    xs = jnp.arange(14.0).reshape(7, 2)
    fn = lambda x: jnp.sin(x).sum()
    run = lambda x: sharded_map(fn, x, make_mesh(1), chunk_size=3)
    got = jax.jit(run)(xs) if jit else run(xs)
    np.testing.assert_allclose(got, chunked_vmap(fn, xs), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        sharded_map(fn, xs, make_mesh(1), chunk_size=0)


def test_mesh_map_one_device_matches():
    import hessjax

    params = {"w": jnp.array([[1.0, 0.5], [0.2, -0.3]])}
    anchor = {"w": jnp.zeros((2, 2))}
    loss = lambda p, ex: 0.5 * jnp.sum((p["w"] @ ex[0] - ex[1]) ** 2) + jnp.sum(p["w"] ** 4)
    examples = (jnp.arange(6.0).reshape(3, 2), jnp.ones((3, 2)))
    a = hessjax.hessian_distance(loss, params, anchor, examples, n=10)
    b = hessjax.hessian_distance(
        loss, params, anchor, examples, n=10, map_fn=mesh_map(make_mesh(1))
    )
    np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=1e-6)
    assert int(a.argmax[0]) == int(b.argmax[0])


def test_initialize_distributed_validates(monkeypatch):
    monkeypatch.delenv("HESSJAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("HESSJAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="coordinator_address"):
        initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed("localhost:1234", num_processes=2, process_id=2)
    monkeypatch.setenv("HESSJAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="num_processes"):
        initialize_distributed()


def test_cli_devices_option(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_measure_run(run, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "measure_run", fake_measure_run)
    for text, value in (("2", 2), ("all", "all")):
        assert cli.main(["measure", str(tmp_path), "--devices", text]) == 2
        assert seen["devices"] == value
    monkeypatch.setattr(cli, "finetune", lambda cfg, **kw: seen.update(cfg=cfg) or {})
    assert cli.main(["finetune", "--devices", "1", "--output-dir", str(tmp_path)]) == 0
    assert seen["cfg"].devices == 1
    with pytest.raises(SystemExit):
        cli.main(["measure", str(tmp_path), "--devices", "0"])
    assert "--devices" in capsys.readouterr().err
    assert data_mesh(None) is None and mesh_size(data_mesh(1)) == 1
    with pytest.raises(ValueError, match="devices"):
        data_mesh(jax.device_count() + 1)


# ------------------------------------------------------------------- 4 simulated devices
@pytest.fixture(scope="module")
def multi():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sharding_checks.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_multi_has_four_devices(multi):
    assert multi["num_devices"] == 4


@pytest.mark.parametrize(
    "name",
    ["canonical_4", "canonical_3", "reference_4", "screened_4", "screened_3", "psd_4", "psd_3"],
)
def test_sharded_measure_equals_unsharded(multi, name):
    r = multi[f"measure_{name}"]
    assert r["per_layer_rel"] < 1e-5
    assert r["argmax_equal"] and r["losses_shape_equal"] and r["losses"] < 1e-5
    assert abs(r["measure"][0] - r["measure"][1]) < 1e-5 * abs(r["measure"][0])


def test_sharded_measure_max_in_last_shard(multi):
    r = multi["measure_last_shard"]
    assert r["argmax"] == r["argmax_sharded"] and r["argmax"][0] >= 9  # last of 4 shards
    assert r["per_layer"] < 1e-5


def test_sharded_estimators_equal_unsharded(multi):
    assert multi["hutchinson_trace"]["value"] < 1e-5
    assert multi["hutchinson_trace"]["stderr"] < 1e-5
    assert multi["hutchinson_jit"] < 1e-5
    sd = multi["spectral_density"]
    assert sd["nodes"] < 1e-4 and sd["weights"] < 1e-4 and sd["density_rel"] < 1e-4


def test_shard_batch_uneven(multi):
    r = multi["shard_batch"]
    assert r["shape"] == [8] and r["rows_per_device"] == [2]
    assert r["mask"] == [True] * 6 + [False] * 2
    assert r["padding"] == [0, 1, 2, 3, 4, 5, 5, 5]


def test_fsdp_placement(multi):
    assert multi["fsdp"]["w"] == ["P(None, 'data')", [6, 2]]
    assert multi["fsdp"]["b"][0] == "P()" and multi["fsdp"]["u"][0] == "P()"  # small; 5x7


def test_sharded_fit_equals_unsharded(multi):
    r = multi["fit"]
    assert r["steps"] == [3, 3] and r["moved"] > 1e-3  # training did change the params
    assert r["params"] < 1e-5 and r["batch_stats"] < 1e-5 and r["fsdp_params"] < 1e-5
    assert any("'data'" in s for s in r["fsdp_specs"])
    assert "config.batch_size" in multi["fit_uneven_batch_error"]
