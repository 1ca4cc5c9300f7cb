"""Shared fixtures: one S3 server and one local Ray per test session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Tiny models on a 2-core machine: one torch thread per process (two spin against each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NEON_RAY_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "neon_ray"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache",
                                                           "torch_extensions"))


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server on loopback with bucket ``neon``."""
    from s3server import start_s3

    server = start_s3(buckets=("neon",))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server):
    """A StorageConfig pointing at the test S3 server."""
    from neon_ray.storage import StorageConfig

    return StorageConfig(endpoint_url=s3_server.endpoint, access_key=s3_server.access_key,
                         secret_key=s3_server.secret_key, region="us-east-1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      os.path.dirname(os.path.abspath(__file__))))}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_flow_base(tmp_path_factory):
    """A briefly pretrained tiny flow model on digits (a real, if rough, base)."""
    from neon_ray.config import from_dict
    from neon_ray.pretrain import PretrainConfig, run

    out = str(tmp_path_factory.mktemp("bases") / "flow-tiny")
    run(from_dict(PretrainConfig, {"out": out, "family": "flow", "preset": "tiny", "steps": 150,
                                   "batch_size": 64, "progress": False}))
    return out
