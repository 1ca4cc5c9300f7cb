"""Stage 1: shard plan, determinism, resume, S3, faults, refusals."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from neon_ray import storage as st
from neon_ray.config import ConfigError, from_dict
from neon_ray.data import synthetic
from neon_ray.sample import (SampleConfig, ShardSpec, check_shard, run, sample_labels, sample_seeds,
                             shard_plan)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw):
    base = {"num": 40, "shard_size": 8, "seed": 3, "batch_size": 8, "progress": False,
            "sampler": {"steps": 4}}
    base.update(kw)
    return from_dict(SampleConfig, base)


def _shards(out):
    return [n for n in os.listdir(out) if n.startswith("shard-")] if os.path.isdir(out) else []


def payloads(uri, storage=None):
    table = synthetic.read_table(uri, storage)
    return dict(zip(table.column("index").to_pylist(), table.column("image").to_pylist()))


# Pure core -------------------------------------------------------------------------

def test_shard_plan_covers_every_index_once():
    plan = shard_plan(103, 10)
    assert [s.stop - s.start for s in plan] == [10] * 10 + [3]
    assert np.array_equal(np.concatenate([np.arange(s.start, s.stop) for s in plan]), np.arange(103))


def test_labels_balanced_and_seeds_unique():
    idx = np.arange(1000)
    counts = np.bincount(sample_labels(0, idx, 10, per_class=True), minlength=10)
    assert counts.tolist() == [100] * 10
    random_labels = sample_labels(0, idx, 10, per_class=False)
    assert set(random_labels.tolist()) == set(range(10)) and not np.array_equal(random_labels, idx % 10)
    assert np.array_equal(random_labels, sample_labels(0, idx, 10, per_class=False))
    assert len(set(sample_seeds(5, idx).tolist())) == 1000
    assert (sample_labels(0, idx, 0, True) == -1).all()


def test_check_shard_rejects_truncated_and_wrong_rows():
    spec = ShardSpec(0, 0, 4)
    good = synthetic.table_bytes(synthetic.shard_table([b"x"] * 4, [0] * 4, [1] * 4, [0, 1, 2, 3]))
    assert check_shard(good, spec)
    assert not check_shard(good[: len(good) // 2], spec)
    assert not check_shard(good, ShardSpec(0, 0, 5))


# Stage on local Ray --------------------------------------------------------------

def test_determinism_across_workers_and_batch_sizes(ray_local, tiny_flow_base, tmp_path):
    one = run(cfg(checkpoint=tiny_flow_base, out=str(tmp_path / "a"), workers=1, batch_size=8))
    two = run(cfg(checkpoint=tiny_flow_base, out=str(tmp_path / "b"), workers=2, batch_size=3))
    assert one["sampled"] == two["sampled"] == 5
    a, b = payloads(str(tmp_path / "a")), payloads(str(tmp_path / "b"))
    assert sorted(a) == list(range(40)) and a == b
    manifest = one["manifest"]
    assert manifest["num"] == 40 and sum(s["rows"] for s in manifest["shards"]) == 40
    assert manifest["label_counts"] == {str(k): 4 for k in range(10)}
    # A re-run of a finished stage samples nothing.
    assert run(cfg(checkpoint=tiny_flow_base, out=str(tmp_path / "a")))["sampled"] == 0


def test_resume_redoes_only_missing_truncated_or_corrupt(ray_local, tiny_flow_base, tmp_path):
    out = str(tmp_path / "s")
    run(cfg(checkpoint=tiny_flow_base, out=out))
    before = payloads(out)
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "shard-000001.parquet"))
    path = os.path.join(out, "shard-000003.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    result = run(cfg(checkpoint=tiny_flow_base, out=out))
    assert (result["sampled"], result["kept"]) == (2, 3)
    assert payloads(out) == before


def test_other_settings_are_refused(ray_local, tiny_flow_base, tmp_path):
    out = str(tmp_path / "s")
    run(cfg(checkpoint=tiny_flow_base, out=out, num=16))
    with pytest.raises(FileExistsError, match="other settings"):
        run(cfg(checkpoint=tiny_flow_base, out=out, num=16, seed=4))


def test_stage_on_s3_reads_back_through_pyarrow_and_ray_data(ray_local, tiny_flow_base, s3_storage):
    out = "s3://neon/synthetic-s3"
    run(cfg(checkpoint=tiny_flow_base, out=out, workers=2, storage=s3_storage.__dict__))
    import pyarrow.dataset as pads

    fs, path = st.pyarrow_filesystem(out, s3_storage)
    table = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True).to_table()
    assert table.num_rows == 40 and sorted(table.column("index").to_pylist()) == list(range(40))
    ds = synthetic.ray_dataset(out, s3_storage)
    rows = ds.take_all()
    assert sorted(r["index"] for r in rows) == list(range(40))
    images = synthetic.decode_images([rows[0]["image"]])
    assert images.shape == (1, 1, 8, 8) and str(images.dtype) == "torch.uint8"


def test_killed_actor_still_gives_exactly_n_rows(ray_local, tiny_flow_base, tmp_path):
    import ray

    out = str(tmp_path / "s")
    config = cfg(checkpoint=tiny_flow_base, out=out, num=120, shard_size=4, workers=2,
                 sampler={"steps": 16})
    result = {}
    thread = threading.Thread(target=lambda: result.update(run(config)))
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not _shards(out):
        time.sleep(0.05)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("neon-sampler-")]
    assert names, "no sampler actor to kill"
    ray.kill(ray.get_actor(names[0]))
    thread.join(timeout=300)
    assert result["manifest"]["num"] == 120
    idx = sorted(payloads(out))
    assert idx == list(range(120))


def test_interrupted_driver_resumes_only_missing_shards(ray_local, tiny_flow_base, tmp_path):
    out = str(tmp_path / "s")
    args = [sys.executable, "-m", "neon_ray.cli", "sample", "--checkpoint", tiny_flow_base, "--out", out,
            "--num", "200", "--shard-size", "4", "--seed", "3", "--steps", "4", "--batch-size", "8",
            "--no-progress", "--set", "cpus_per_worker=0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_shards(out)) < 3:
        time.sleep(0.1)
    # Kill the driver with the local Ray it started; an actor that outlives it for a moment may
    # still finish a shard, so count the shards once none has appeared for 3 s.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    present, stable_since = sorted(_shards(out)), time.time()
    while time.time() - stable_since < 3:
        time.sleep(0.2)
        if sorted(_shards(out)) != present:
            present, stable_since = sorted(_shards(out)), time.time()
    assert 3 <= len(present) < 50 and "manifest.json" not in os.listdir(out)
    result = run(cfg(checkpoint=tiny_flow_base, out=out, num=200, shard_size=4, batch_size=8))
    assert result["sampled"] == 50 - len(present) and result["kept"] == len(present)
    assert sorted(payloads(out)) == list(range(200))


# Refusals before any actor starts --------------------------------------------------

def test_bad_input_is_refused_before_work(tiny_flow_base, tmp_path):
    from neon_ray.sample import prepare

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        prepare(cfg(checkpoint=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="num: must be >= 1, got 0"):
        cfg(checkpoint=tiny_flow_base, out="x", num=0)
    with pytest.raises(ConfigError, match="shard_size: must be >= 1, got -2"):
        cfg(checkpoint=tiny_flow_base, out="x", shard_size=-2)
    with pytest.raises(ConfigError, match="sampler.guidance: must be >= 0.0"):
        prepare(cfg(checkpoint=tiny_flow_base, out=str(tmp_path / "o"), sampler={"guidance": -1}))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(st.StorageError, match="not writable"):
        prepare(cfg(checkpoint=tiny_flow_base, out=str(blocker / "sub")))
    bad_s3 = {"endpoint_url": "http://127.0.0.1:9", "access_key": "a", "secret_key": "b",
              "connect_timeout": 1, "retries": 1}
    with pytest.raises(st.StorageError, match="unreachable"):
        prepare(cfg(checkpoint=tiny_flow_base, out="s3://neon/x", storage=bad_s3))
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_removed_node_still_gives_exactly_n_rows(tiny_flow_base, tmp_path):
    out = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "node_removal.py"), tiny_flow_base, out],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rows": 160, "unique": 160, "removed_mid_run": True, "manifest_num": 160}
