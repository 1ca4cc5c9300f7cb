"""Feature extractors, reference statistics and evaluation on the bundled digits."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from neon_ray.data.digits import load_digits
from neon_ray.evaluate.features import (INCEPTION_FILE, INCEPTION_ID, ExtractorConfig, build_extractor,
                                        extract)
from neon_ray.evaluate.refstats import (RefStats, check_compatible, load_ref_stats, merge_ref_stats,
                                        ref_stats_from_features, save_ref_stats)
from neon_ray.evaluate.run import (RefStatsConfig, balanced_labels, evaluate_features, evaluate_images,
                                   run_ref_stats)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny; on a busy 2-core machine a 2-thread pool mostly waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return build_extractor(ExtractorConfig(kind="digits", cache_dir=cache_dir))


@pytest.fixture(scope="module")
def splits():
    images, labels = load_digits()
    return images[0::2], images[1::2], labels[0::2]  # A (899), B (898), labels of A


@pytest.fixture(scope="module")
def feats_a(extractor, splits):
    return extract(extractor, splits[0])  # (899, 64)


@pytest.fixture(scope="module")
def ref_b(extractor, splits):
    return ref_stats_from_features(extract(extractor, splits[1]), extractor.id, source="digits-B")


def test_digits_extractor_is_deterministic_and_cached(extractor, cache_dir, tmp_path):
    assert extractor.id.startswith("digits-cnn-v1:") and extractor.dim == 64
    weights = os.path.join(cache_dir, "digits-cnn-v1.safetensors")
    meta = json.loads(open(os.path.join(cache_dir, "digits-cnn-v1.json")).read())
    assert extractor.id == f"digits-cnn-v1:{meta['sha256'][:12]}"
    # A second training, in a fresh cache folder and another process, gives the same bytes.
    code = ("import sys; from neon_ray.evaluate.features import ExtractorConfig, build_extractor; "
            "print(build_extractor(ExtractorConfig(cache_dir=sys.argv[1])).id)")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True,
                           text=True).stdout.strip()
    assert other == extractor.id
    assert open(weights, "rb").read() == (tmp_path / "digits-cnn-v1.safetensors").read_bytes()
    # A second build reuses the cache (no retraining) and gives the same features.
    mtime = os.path.getmtime(weights)
    again = build_extractor(ExtractorConfig(cache_dir=cache_dir))
    assert os.path.getmtime(weights) == mtime
    images = load_digits()[0][:50]
    np.testing.assert_array_equal(extract(again, images), extract(extractor, images))
    # Features do not depend on the batch size.
    small = build_extractor(ExtractorConfig(cache_dir=cache_dir, batch_size=7))
    np.testing.assert_allclose(extract(small, images), extract(extractor, images), rtol=1e-5, atol=1e-5)


def test_tampered_cache_is_refused(tmp_path):
    (tmp_path / "digits-cnn-v1.safetensors").write_bytes(b"not the weights we wrote")
    (tmp_path / "digits-cnn-v1.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256 differs"):
        build_extractor(ExtractorConfig(cache_dir=str(tmp_path)))


def test_cache_dir_comes_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEON_RAY_CACHE", str(tmp_path))
    cfg = ExtractorConfig(kind="inception")
    assert cfg.resolved_cache_dir() == str(tmp_path)
    assert cfg.resolved_inception_path() == os.path.join(str(tmp_path), INCEPTION_FILE)


def test_digits_extractor_rejects_other_shapes(extractor):
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(2, 1, 8, 8))


def test_fid_separates_real_from_corrupted_digits(extractor, splits, feats_a, ref_b):
    a = splits[0]
    g = torch.Generator().manual_seed(0)
    flat = a.reshape(a.shape[0], -1)
    shuffled = torch.stack([row[torch.randperm(64, generator=g)] for row in flat]).reshape(a.shape)
    noise = torch.randint(0, 256, a.shape, generator=g, dtype=torch.uint8)
    real = evaluate_images(a, ref_b, extractor)
    assert real["fid"] == pytest.approx(evaluate_features(feats_a, ref_b)["fid"], rel=1e-12)
    on_shuffled = evaluate_images(shuffled, ref_b, extractor)
    on_noise = evaluate_images(noise, ref_b, extractor)
    assert real["feature_space"] == extractor.id
    assert real["fid"] < 0.05 * on_shuffled["fid"]
    assert real["fid"] < 0.05 * on_noise["fid"]
    # Real vs real: both manifolds hold most of the other set; noise lies off the real manifold.
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert on_noise["precision"] < 0.1 and on_shuffled["precision"] < 0.2


def test_dropping_classes_keeps_precision_and_lowers_recall(splits, feats_a, ref_b):
    labels = splits[2].numpy()
    half = evaluate_features(feats_a[labels < 5], ref_b)
    full = evaluate_features(feats_a, ref_b)
    assert half["precision"] > 0.8
    assert half["recall"] < 0.7 * full["recall"]
    assert half["fid"] > 5 * full["fid"]


def test_ref_stats_roundtrip_merge_and_foreign_id(extractor, splits, feats_a, ref_b, tmp_path):
    uri = str(tmp_path / "ref.npz")
    save_ref_stats(uri, ref_b)
    back = load_ref_stats(uri)
    assert back.extractor_id == extractor.id and back.n == 898 and back.source == "digits-B"
    np.testing.assert_array_equal(back.mu, ref_b.mu)
    np.testing.assert_array_equal(back.features, ref_b.features)
    # Statistics of split A merged with B equal those of A ∪ B.
    ref_a = ref_stats_from_features(feats_a, extractor.id)
    both = merge_ref_stats(ref_a, back)
    feats = np.concatenate([feats_a, extract(extractor, splits[1])])
    whole = ref_stats_from_features(feats, extractor.id)
    np.testing.assert_allclose(both.sigma, whole.sigma, rtol=1e-9, atol=1e-9)
    assert both.n == 1797
    # Statistics from another extractor are refused, naming both ids.
    other = RefStats("inception-v3-clean-fid", ref_b.mu, ref_b.sigma, ref_b.n, None, ref_b.features)
    with pytest.raises(ValueError, match=f"inception-v3-clean-fid.*{extractor.id}"):
        check_compatible(other, extractor)
    with pytest.raises(ValueError, match="inception-v3-clean-fid"):
        evaluate_images(splits[0], other, extractor)


def test_mu_sigma_only_npz_is_accepted_with_an_assumed_id(extractor, feats_a, ref_b, tmp_path):
    path = tmp_path / "adm.npz"
    np.savez(path, mu=ref_b.mu, sigma=ref_b.sigma)
    assert load_ref_stats(str(path)).extractor_id == INCEPTION_ID
    stats = load_ref_stats(str(path), assume_extractor_id=extractor.id)
    assert stats.features is None and stats.moments is None
    out = evaluate_features(feats_a, stats)
    assert out["fid"] == pytest.approx(evaluate_features(feats_a, ref_b)["fid"], rel=1e-9)
    assert out["precision"] is None and out["recall"] is None
    np.savez(tmp_path / "bad.npz", mean=ref_b.mu)
    with pytest.raises(ValueError, match="no mu, sigma"):
        load_ref_stats(str(tmp_path / "bad.npz"))


def test_missing_inception_weights_name_the_path(tmp_path):
    path = str(tmp_path / "nowhere" / INCEPTION_FILE)
    with pytest.raises(FileNotFoundError, match=f"{path}.*download"):
        build_extractor(ExtractorConfig(kind="inception", inception_path=path))


def test_inception_path_runs_a_torchscript_file_with_clean_resize(tmp_path):
    # A stand-in TorchScript file with clean-fid's interface (`.layers` → (N, 2048, 1, 1)):
    # every feature is the mean pixel over channels, so the scaling can be checked.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv = torch.nn.Conv2d(3, 2048, 1, bias=False)
            torch.nn.init.constant_(conv.weight, 1 / 3)
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), conv)

        def forward(self, x):
            return self.layers(x)

    path = str(tmp_path / INCEPTION_FILE)
    torch.jit.save(torch.jit.script(Net()), path)
    ext = build_extractor(ExtractorConfig(kind="inception", inception_path=path, batch_size=2))
    assert ext.id == INCEPTION_ID and ext.dim == 2048
    white = torch.full((3, 1, 8, 8), 255, dtype=torch.uint8)
    feats = extract(ext, white)
    np.testing.assert_allclose(feats, (255 - 128) / 128, rtol=1e-5)  # clean-fid's (x − 128) / 128
    gray = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    np.testing.assert_allclose(extract(ext, gray), extract(ext, gray.repeat(1, 3, 1, 1)), rtol=1e-6)


def test_user_extractor(tmp_path, monkeypatch):
    (tmp_path / "my_features.py").write_text(textwrap.dedent("""
        import torch

        class Mean:
            id, dim = "pixel-mean-v1", 1

            def __call__(self, images):
                return images.float().mean(dim=(1, 2, 3))[:, None]

        def make(cfg):
            return Mean()

        def bad(cfg):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ext = build_extractor(ExtractorConfig(kind="user", user="my_features:make"))
    feats = extract(ext, torch.full((4, 1, 2, 2), 10, dtype=torch.uint8))
    assert feats.dtype == np.float32 and feats.shape == (4, 1) and (feats == 10).all()
    with pytest.raises(ValueError, match="not an extractor"):
        build_extractor(ExtractorConfig(kind="user", user="my_features:bad"))


def test_run_ref_stats_writes_npz(cache_dir, tmp_path):
    out = str(tmp_path / "digits.npz")
    summary = run_ref_stats(RefStatsConfig(out=out, max_features=500,
                                           extractor=ExtractorConfig(cache_dir=cache_dir)))
    stats = load_ref_stats(out)
    assert summary["n"] == stats.n == 1797
    assert stats.features.shape == (500, 64) and stats.moments.n == 1797
    with pytest.raises(ValueError, match="more than 64"):
        run_ref_stats(RefStatsConfig(out=out, limit=64, extractor=ExtractorConfig(cache_dir=cache_dir)))


def test_balanced_labels():
    assert balanced_labels(5, 2).tolist() == [0, 1, 0, 1, 0]
    assert balanced_labels(3, 0).tolist() == [-1, -1, -1]


REPLAY_FAMILY = '''
from dataclasses import dataclass

import torch

from neon_ray.data.digits import load_digits
from neon_ray.families.base import Family


@dataclass
class ReplayConfig:
    image_size: int = 8
    channels: int = 1
    num_classes: int = 10


class Replay(Family):
    """Samples are real digits (even indices), picked by label and seed: a stand-in generator."""

    name, config_cls, presets = "replay", ReplayConfig, {"tiny": ReplayConfig}

    def build(self, config):
        return torch.nn.Linear(1, 1)

    def loss(self, model, images, labels):
        return model.weight.sum()

    def sample(self, model, labels, seeds, sampler):
        images, all_labels = load_digits()
        images, all_labels = images[0::2], all_labels[0::2]
        out = []
        for label, seed in zip(labels.tolist(), seeds.tolist()):
            pool = images[all_labels == label]
            out.append(pool[seed % pool.shape[0]])
        return torch.stack(out)  # (N, 1, 8, 8) uint8
'''


def test_run_evaluates_a_checkpoint_end_to_end(cache_dir, ref_b, tmp_path, monkeypatch):
    from neon_ray.checkpoints import CheckpointInfo, save_checkpoint
    from neon_ray.evaluate.run import EvaluateConfig, run

    (tmp_path / "replay_family.py").write_text(REPLAY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, torch.nn.Linear(1, 1).state_dict(),
                    CheckpointInfo(family="replay_family:Replay", model={}))
    ref_uri = str(tmp_path / "ref.npz")
    save_ref_stats(ref_uri, ref_b)
    ext_cfg = ExtractorConfig(cache_dir=cache_dir)
    cfg = EvaluateConfig(checkpoint=ckpt, ref_stats=ref_uri, num_samples=300, batch_size=64,
                         extractor=ext_cfg, out=str(tmp_path / "out.json"))
    results = run(cfg)
    assert json.loads((tmp_path / "out.json").read_text())["fid"] == pytest.approx(results["fid"])
    assert results["num_samples"] == 300 and results["feature_space"] == ref_b.extractor_id
    assert results["precision"] > 0.8 and results["recall"] > 0.3  # 300 samples cover a third
    # Labels i % 10 and seeds seed + i: the same images whatever the batch size.
    images, labels = load_digits()
    images, labels = images[0::2], labels[0::2]
    expect = torch.stack([images[labels == i % 10][i % int((labels == i % 10).sum())] for i in range(300)])
    direct = evaluate_images(expect, ref_b, build_extractor(ext_cfg))
    assert results["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    again = run(EvaluateConfig(checkpoint=ckpt, ref_stats=ref_uri, num_samples=300, batch_size=7,
                               extractor=ext_cfg))
    assert again["fid"] == pytest.approx(results["fid"], rel=1e-6)
    # Cheap checks fail before the checkpoint is touched.
    with pytest.raises(ValueError, match="more than 64 samples"):
        run(EvaluateConfig(checkpoint="/nowhere", ref_stats=ref_uri, num_samples=64, extractor=ext_cfg))
    save_ref_stats(str(tmp_path / "other.npz"), RefStats("other-net:1", ref_b.mu, ref_b.sigma))
    with pytest.raises(ValueError, match="other-net:1"):
        run(EvaluateConfig(checkpoint="/nowhere", ref_stats=str(tmp_path / "other.npz"), extractor=ext_cfg))
