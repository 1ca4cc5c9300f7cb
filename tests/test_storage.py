"""Storage and checkpoints: local and a real S3 server (SeaweedFS on loopback)."""

import os

import pytest
import torch

from neon_ray import checkpoints as ck
from neon_ray import storage as st
from neon_ray.storage import StorageConfig, StorageError


def _state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(64, generator=g),
            "b.weight": torch.randn(128, 64, generator=g).to(torch.bfloat16),
            "mask": torch.tensor([[0.0, float("-inf")], [0.0, 0.0]]),
            "steps": torch.arange(5)}


def _info():
    return ck.CheckpointInfo(family="flow", model={"image_size": 8}, preset="tiny",
                             weights="ema", images_seen=1000, base_train_images=1000)


@pytest.mark.parametrize("scheme", ["local", "file", "s3"])
def test_bytes_json_manifest_round_trip(scheme, tmp_path, request):
    storage = request.getfixturevalue("s3_storage") if scheme == "s3" else None
    root = {"local": str(tmp_path), "file": f"file://{tmp_path}",
            "s3": f"s3://neon/{tmp_path.name}-{scheme}"}[scheme]
    st.write_bytes(st.join(root, "x.bin"), b"hello", storage)
    st.write_json(st.join(root, "y.json"), {"k": [1, 2]}, storage)
    assert st.read_bytes(st.join(root, "x.bin"), storage) == b"hello"
    assert st.read_json(st.join(root, "y.json"), storage) == {"k": [1, 2]}
    assert st.listdir(root, storage) == ["x.bin", "y.json"]
    st.write_manifest(root, ["x.bin", "y.json"], {"kind": "test"}, storage)
    manifest = st.verify_manifest(root, storage)
    assert manifest["files"]["x.bin"]["sha256"] == st.sha256_bytes(b"hello")
    st.write_bytes(st.join(root, "x.bin"), b"HELLO", storage)  # tamper
    assert st.verify_manifest(root, storage) is None
    with pytest.raises(FileNotFoundError, match="not found"):
        st.read_bytes(st.join(root, "missing"), storage)


def test_local_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"

    def boom(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RuntimeError):
        st.write_bytes(str(target), b"x" * 100)
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temp file left behind either


@pytest.mark.parametrize("shard_bytes", [1 << 30, 10_000])
def test_checkpoint_round_trip_local(tmp_path, shard_bytes):
    sd = _state_dict()
    ck.save_checkpoint(str(tmp_path / "c"), sd, _info(), max_shard_bytes=shard_bytes)
    files = os.listdir(tmp_path / "c")
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 1 << 20)
    back = ck.load_state_dict(str(tmp_path / "c"))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    info = ck.load_info(str(tmp_path / "c"))
    assert info == _info()
    with pytest.raises(FileExistsError, match="never overwritten"):
        ck.save_checkpoint(str(tmp_path / "c"), sd, _info())


def test_checkpoint_and_manifest_through_s3(s3_storage):
    uri = "s3://neon/ckpt-roundtrip"
    sd = _state_dict(1)
    ck.save_checkpoint(uri, sd, _info(), s3_storage, max_shard_bytes=20_000)
    assert st.verify_manifest(uri, s3_storage) is not None
    back = ck.load_state_dict(uri, s3_storage)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    streamed = dict(ck.iter_tensors(uri, s3_storage))
    assert all(torch.equal(streamed[k], sd[k]) for k in sd)
    assert ck.load_info(uri, s3_storage).images_seen == 1000
    assert len(ck.checkpoint_digest(uri, s3_storage)) == 64


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope \(no config.json\)"):
        ck.load_info(str(tmp_path / "nope"))


def test_unreachable_s3_endpoint_is_one_line_error():
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b",
                            connect_timeout=1, retries=1)
    with pytest.raises(StorageError, match="unreachable") as e:
        st.check_writable("s3://neon/x", storage)
    assert "\n" not in str(e.value)


def test_credentialless_s3_is_one_line_error(s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = StorageConfig(endpoint_url=s3_server.endpoint, connect_timeout=1, retries=1)
    with pytest.raises(StorageError, match="no S3 credentials|denied|Forbidden|AccessDenied") as e:
        st.check_writable("s3://neon/x", storage)
    assert "\n" not in str(e.value)


def test_official_pth_weights_only(tmp_path):
    sd = {"w": torch.ones(2, 2)}
    path = tmp_path / "release.pth"
    torch.save({"model": {"w": torch.zeros(2, 2)}, "model_ema": sd, "epoch": 3}, path)
    assert torch.equal(ck.load_official_state_dict(str(path), "ema")["w"], sd["w"])
    assert torch.equal(ck.load_official_state_dict(str(path), "raw")["w"], torch.zeros(2, 2))
