"""Stage 3: the Neon merge (math, streaming checkpoints, refusals, in-memory) and the importer."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from neon_ray import checkpoints as ck
from neon_ray import tensorfile as tf
from neon_ray import merge as M
from neon_ray import storage as st
from neon_ray.cli import main as cli_main
from neon_ray.config import option, to_dict
from neon_ray.families.base import Family, get_family
from neon_ray.importer import ImportConfig, run_import

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


# A tiny family: two linear layers, a layer norm, a float buffer and an int buffer. -------------

@dataclass
class TinyConfig:
    image_size: int = option(4, "side")
    channels: int = option(1, "channels")
    num_classes: int = option(0, "classes")
    width: int = option(8, "hidden width")
    dtype: str = option("float32", "parameter dtype")


class TinyNet(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        d = c.channels * c.image_size ** 2
        self.inp = nn.Linear(d, c.width)
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, d)
        self.register_buffer("pos", torch.linspace(-1, 1, c.width))          # float buffer: copied
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))    # non-float: copied
        self.to(getattr(torch, c.dtype))


class TinyFamily(Family):
    name = "tiny-test"
    config_cls = TinyConfig
    presets = {"small": lambda: TinyConfig(width=8), "wide": lambda: TinyConfig(width=16)}

    def build(self, config):
        return TinyNet(config)

    def loss(self, model, images, labels):
        return model.out(model.inp(images.flatten(1))).square().mean()

    def sample(self, model, labels, seeds, sampler):
        return torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)


class OtherFamily(TinyFamily):
    name = "other-test"


FAMILY = f"{__name__}:TinyFamily"


class Opaque:
    """A custom class: a pickle holding it needs full unpickling."""


# Helpers -------------------------------------------------------------------------------------

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at float64 values ``x`` (subnormals included)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.float64).tiny)))
    return torch.exp2(e.clamp_min(MIN_EXP[dtype]) - MANTISSA[dtype])


def reference(r: torch.Tensor, s: torch.Tensor, w: float) -> torch.Tensor:
    r64, s64 = r.double(), s.double()
    return r64 - w * (s64 - r64)


def within_one_ulp(out: torch.Tensor, r: torch.Tensor, s: torch.Tensor, w: float) -> torch.Tensor:
    """|out − exact| ≤ 1 ulp of out's dtype, allowing the float64 reference its own rounding."""
    ref = reference(r, s, w)
    r64, s64 = r.double(), s.double()
    slack = 2.0 ** -50 * (r64.abs() + abs(w) * (s64 - r64).abs())
    return (out.double() - ref).abs() <= ulp(ref, out.dtype) + slack


def random_pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_r ~ N(0, 0.05²) with a spread of magnitudes, θ_s = θ_r + a small fine-tuning step."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    r[: n // 4] *= torch.rand(n // 4, generator=g, dtype=torch.float64) * 1e-2   # near-cancellation
    s = r + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    return r.to(dtype), s.to(dtype)


def tiny_state(dtype: torch.dtype, seed: int, width: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = TinyNet(TinyConfig(width=width, dtype=str(dtype).split(".")[1])).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def save(uri, sd, family=FAMILY, dtype=torch.float32, shard=ck.DEFAULT_SHARD_BYTES, storage=None):
    info = ck.CheckpointInfo(family=family, model=to_dict(TinyConfig(
        width=sd["pos"].numel(), dtype=str(dtype).split(".")[1])), preset="small", images_seen=100)
    ck.save_checkpoint(str(uri), sd, info, storage, shard)
    return str(uri)


def pair(tmp_path, dtype=torch.float32, shard=ck.DEFAULT_SHARD_BYTES):
    """A base checkpoint and a fine-tuned one whose buffers also differ."""
    base = tiny_state(dtype, 0)
    ft = {k: (v + 1e-3 * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v + 7
          for k, v in base.items()}
    return base, ft, save(tmp_path / "base", base, dtype=dtype, shard=shard), \
        save(tmp_path / "ft", ft, dtype=dtype, shard=shard)


# The math ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w", [0.3, 1.6, 3.0, -0.7])
def test_neon_tensor_within_one_ulp_of_float64(dtype, w):
    r, s = random_pair(20000, dtype)
    out = M.neon_tensor(r, s, w)
    assert out.dtype == dtype
    assert bool(within_one_ulp(out, r, s, w).all())
    # The test has teeth: the same formula in the weights' own dtype misses by more than an ulp.
    assert not bool(within_one_ulp(r - w * (s - r), r, s, w).all())


def test_exact_cancellation_on_bf16_grid():
    """1.3 θ_r = 0.3 θ_s exactly: fp32 arithmetic leaves 1e-11, far from the ~1e-20 truth."""
    r = torch.tensor([-21 * 2.0 ** -16], dtype=torch.bfloat16)
    s = torch.tensor([-91 * 2.0 ** -16], dtype=torch.bfloat16)
    assert bool(within_one_ulp(M.neon_tensor(r, s, 0.3), r, s, 0.3).all())
    fp32 = torch.lerp(r.float(), s.float(), -0.3).to(torch.bfloat16)
    assert not bool(within_one_ulp(fp32, r, s, 0.3).all())


def test_w_zero_is_base_bit_exact_and_minus_one_is_finetuned():
    r, s = random_pair(1000, torch.float32)
    r[0], s[1] = -0.0, float("inf")
    assert torch.equal(M.neon_tensor(r, s, 0.0).view(torch.int32), r.view(torch.int32))
    for dtype in DTYPES:
        r, s = random_pair(1000, dtype, seed=3)
        assert torch.equal(M.neon_tensor(r, s, -1.0), s)


def test_non_finite_base_entries_kept():
    r, s = random_pair(100, torch.bfloat16)
    r[3], r[5], r[7] = float("nan"), float("inf"), float("-inf")
    out = M.neon_tensor(r, s, 1.5)
    assert torch.isnan(out[3]) and out[5] == float("inf") and out[7] == float("-inf")
    keep = torch.ones(100, dtype=torch.bool)
    keep[[3, 5, 7]] = False
    assert torch.equal(out[keep], M.neon_tensor(r[keep], s[keep], 1.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", True])
def test_non_finite_w_refused(bad):
    with pytest.raises(ValueError, match="w: must be a finite number"):
        M.neon_tensor(torch.zeros(2), torch.zeros(2), bad)


# The streaming merge ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_merge_matches_reference_sharded(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(M, "CHUNK", 24)          # several chunks per tensor
    base, ft, b, f = pair(tmp_path, dtype, shard=200)
    assert len(ck.weight_files(b)) > 1
    manifest = M.merge_checkpoints(b, f, 1.6, str(tmp_path / "out"), max_shard_bytes=300)
    out = str(tmp_path / "out")
    assert len(ck.weight_files(out)) > 1 and st.verify_manifest(out) is not None
    merged = ck.load_state_dict(out)
    assert set(merged) == set(base)
    for k in ("inp.weight", "inp.bias", "norm.weight", "out.weight", "out.bias"):
        assert merged[k].dtype == dtype
        assert bool(within_one_ulp(merged[k], base[k], ft[k], 1.6).all()), k
        assert torch.equal(merged[k], M.neon_tensor(base[k], ft[k], 1.6))
    assert torch.equal(merged["pos"], base["pos"]) and not torch.equal(ft["pos"], base["pos"])
    assert torch.equal(merged["steps"], base["steps"]) and ft["steps"] != base["steps"]
    # Provenance in config.json and the manifest; the result loads strictly into the network.
    neon = {"w": 1.6, "base_digest": ck.checkpoint_digest(b), "finetuned_digest": ck.checkpoint_digest(f)}
    assert manifest["neon"] == neon and manifest["family"] == FAMILY
    info = ck.load_info(out)
    assert {k: info.extra["neon"][k] for k in neon} == neon and info.images_seen == 100
    _, _, model, _ = ck.load_model(out, expect_family=FAMILY)
    assert torch.equal(model.out.weight, merged["out.weight"])


@pytest.mark.parametrize("name", ["flow", "xar"])
def test_merge_builtin_family_tiny(tmp_path, name):
    family = get_family(name)
    config = family.model_config("tiny")
    torch.manual_seed(0)
    model = family.build(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    info = ck.CheckpointInfo(family=name, model=to_dict(config), preset="tiny")
    ck.save_checkpoint(str(tmp_path / "b"), base, info)
    ck.save_checkpoint(str(tmp_path / "f"), ft, info)
    M.merge_checkpoints(str(tmp_path / "b"), str(tmp_path / "f"), 1.5, str(tmp_path / "o"))
    _, _, merged, _ = ck.load_model(str(tmp_path / "o"), expect_family=name)
    buffers = family.buffer_keys(model)
    assert buffers or name == "flow"
    for k, v in merged.state_dict().items():
        want = base[k] if k in buffers or not v.is_floating_point() else M.neon_tensor(base[k], ft[k], 1.5)
        assert torch.equal(v, want), k


def test_streaming_merge_w_zero_and_minus_one(tmp_path):
    base, ft, b, f = pair(tmp_path)
    M.merge_checkpoints(b, f, 0.0, str(tmp_path / "w0"))
    assert all(torch.equal(v, base[k]) for k, v in ck.load_state_dict(str(tmp_path / "w0")).items())
    M.merge_checkpoints(b, f, -1.0, str(tmp_path / "w-1"), max_shard_bytes=100)
    back = ck.load_state_dict(str(tmp_path / "w-1"))
    params = {"inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"}
    assert all(torch.equal(back[k], ft[k] if k in params else base[k]) for k in back)


def test_streaming_merge_keeps_non_finite_base(tmp_path):
    base = tiny_state(torch.float32, 0)
    base["out.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ft = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    ft["out.weight"][0, :3] = 1.0
    M.merge_checkpoints(save(tmp_path / "b", base), save(tmp_path / "f", ft), 2.0, str(tmp_path / "o"))
    row = ck.load_state_dict(str(tmp_path / "o"))["out.weight"][0]
    assert torch.isnan(row[0]) and row[1] == float("inf") and row[2] == -float("inf")
    assert torch.equal(row[3:], M.neon_tensor(base["out.weight"][0, 3:], ft["out.weight"][0, 3:], 2.0))


def test_merge_over_s3(tmp_path, s3_storage):
    base, ft, b, f = pair(tmp_path, shard=700)
    out = "s3://neon/merge-test/out"
    M.merge_checkpoints(b, f, 1.5, out, s3_storage, max_shard_bytes=700)
    assert len(ck.weight_files(out, s3_storage)) == 2
    assert st.verify_manifest(out, s3_storage) is not None
    got = ck.load_state_dict(out, s3_storage)
    assert torch.equal(got["inp.weight"], M.neon_tensor(base["inp.weight"], ft["inp.weight"], 1.5))
    with pytest.raises(FileExistsError):
        M.merge_checkpoints(b, f, 1.5, out, s3_storage)


def test_cli_merge(tmp_path):
    base, ft, b, f = pair(tmp_path)
    out = str(tmp_path / "cli")
    assert cli_main(["merge", "--base", b, "--finetuned", f, "--w", "1.25", "--out", out]) == 0
    assert ck.load_info(out).extra["neon"]["w"] == 1.25
    assert cli_main(["merge", "--base", b, "--finetuned", f, "--w", "1.25", "--out", out]) == 2


# Refusals: one line, naming the culprit, nothing written ---------------------------------------

def _refused(tmp_path, b, f, w=1.0, match="", exc=ValueError):
    out = tmp_path / "refused"
    with pytest.raises(exc, match=match) as e:
        M.merge_checkpoints(b, f, w, str(out))
    assert "\n" not in str(e.value) and not out.exists()


def test_refuses_different_key_sets(tmp_path):
    base = tiny_state(torch.float32, 0)
    ft = dict(base)
    del ft["out.bias"]
    ft["extra.weight"] = torch.zeros(2)
    _refused(tmp_path, save(tmp_path / "b", base), save(tmp_path / "f", ft),
             match=r"missing \[out.bias\], extra \[extra.weight\]")


def test_refuses_shape_and_dtype_mismatch(tmp_path):
    base = tiny_state(torch.float32, 0)
    b = save(tmp_path / "b", base)
    _refused(tmp_path, b, save(tmp_path / "f1", {**base, "inp.bias": torch.zeros(9)}),
             match="tensor 'inp.bias': shape")
    _refused(tmp_path, b, save(tmp_path / "f2", {**base, "out.bias": base["out.bias"].half()}),
             match="tensor 'out.bias': dtype")


def test_refuses_different_families_and_family_mismatch(tmp_path):
    base = tiny_state(torch.float32, 0)
    b = save(tmp_path / "b", base)
    _refused(tmp_path, b, save(tmp_path / "f", base, family=f"{__name__}:OtherFamily"),
             match="families differ")
    # Both agree with each other, but not with the family's network.
    odd = {**base, "stray": torch.zeros(1)}
    _refused(tmp_path, save(tmp_path / "b2", odd), save(tmp_path / "f2", odd), match=r"extra \[stray\]")


def test_refuses_non_finite_w_and_existing_output(tmp_path):
    _, _, b, f = pair(tmp_path)
    _refused(tmp_path, b, f, w=float("nan"), match="w: must be a finite")
    _refused(tmp_path, b, f, w=float("-inf"), match="w: must be a finite")
    M.merge_checkpoints(b, f, 1.0, str(tmp_path / "o"))
    before = sorted(os.listdir(tmp_path / "o"))
    with pytest.raises(FileExistsError):
        M.merge_checkpoints(b, f, 2.0, str(tmp_path / "o"))
    assert sorted(os.listdir(tmp_path / "o")) == before
    assert ck.load_info(str(tmp_path / "o")).extra["neon"]["w"] == 1.0
    with pytest.raises(FileExistsError):
        M.merge_checkpoints(b, f, 2.0, b)


def test_failure_mid_stream_leaves_nothing(tmp_path, monkeypatch):
    _, _, b, f = pair(tmp_path)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args)

    real = M._neon_into
    monkeypatch.setattr(M, "_neon_into", failing)
    with pytest.raises(OSError, match="disk full"):
        M.merge_checkpoints(b, f, 1.0, str(tmp_path / "o"), max_shard_bytes=100)
    assert not (tmp_path / "o").exists()


# In memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_memory_merger(dtype):
    base = tiny_state(dtype, 0)
    ft = {k: (v + 1e-3 * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v + 1
          for k, v in base.items()}
    base["inp.weight"][0, 0] = float("nan")
    model = TinyNet(TinyConfig(dtype=str(dtype).split(".")[1]))
    merger = M.InMemoryMerger(base, ft, copy_keys=get_family(FAMILY).buffer_keys(model))
    ptrs = {k: v.data_ptr() for k, v in merger.merged(1.0).items()}
    for w in (2.5, 0.3, 0.0):
        got = merger.merged(w)
        assert {k: v.data_ptr() for k, v in got.items()} == ptrs          # buffers reused
        merger.load_into(model, w)
        state = model.state_dict()
        for k, v in got.items():
            assert torch.equal(state[k], v) or (torch.isnan(state[k]).any() and torch.equal(
                torch.nan_to_num(state[k]), torch.nan_to_num(v))), k
        assert torch.equal(got["pos"], base["pos"]) and torch.equal(got["steps"], base["steps"])
        assert torch.isnan(got["inp.weight"][0, 0])
        for k in ("inp.weight", "out.weight", "norm.bias"):
            r, s = base[k].double(), ft[k].double()
            ref = reference(base[k], ft[k], w)
            if w == 0.0:
                assert torch.equal(got[k].view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   base[k].view(torch.int16 if dtype != torch.float32 else torch.int32))
            elif dtype == torch.float32:     # fp32 lerp: the documented few-ulp bound
                bound = 2.0 ** -24 * (ref.abs() + 3 * (1 + abs(w)) * (s - r).abs()) * 1.01
                assert bool(((got[k].double() - ref).abs() <= bound)[1:].all()), k
            else:                            # 16-bit: fp32 arithmetic, then one rounding
                bound = 2.0 ** -23 * (ref.abs() + 3 * (1 + abs(w)) * (s - r).abs()) + ulp(ref, dtype)
                assert bool(((got[k].double() - ref).abs() <= bound).flatten()[1:].all()), k
    with pytest.raises(ValueError, match="model keys differ"):
        merger.load_into(nn.Linear(2, 2), 1.0)


# Import of official releases -------------------------------------------------------------------

def _release(tmp_path, extra=None):
    ema, raw = tiny_state(torch.float32, 1, width=16), tiny_state(torch.float32, 2, width=16)
    path = tmp_path / "release.pth"
    torch.save({"model_ema": {"module." + k: v.half() if k == "out.weight" else v for k, v in ema.items()},
                "model": raw, "epoch": 3, **(extra or {})}, path)
    return str(path), ema, raw


def test_import_ema_and_raw(tmp_path):
    path, ema, raw = _release(tmp_path)
    run_import(ImportConfig(family=FAMILY, source=path, out=str(tmp_path / "ema")))
    info = ck.load_info(str(tmp_path / "ema"))
    assert info.preset == "wide" and info.weights == "ema" and info.extra["import"]["sha256"]
    got = ck.load_state_dict(str(tmp_path / "ema"))
    assert got["out.weight"].dtype == torch.float32                  # stored in the network's dtype
    assert torch.equal(got["out.weight"], ema["out.weight"].half().float())
    assert torch.equal(got["inp.weight"], ema["inp.weight"])
    run_import(ImportConfig(family=FAMILY, source=path, out=str(tmp_path / "raw"), which="raw",
                            preset="wide"))
    assert torch.equal(ck.load_state_dict(str(tmp_path / "raw"))["inp.weight"], raw["inp.weight"])
    ck.load_model(str(tmp_path / "raw"), expect_family=FAMILY)


def test_import_refuses_wrong_preset_and_shapes(tmp_path):
    path, _, _ = _release(tmp_path)
    with pytest.raises(ValueError, match="tensor 'inp.bias' has shape") as e:
        run_import(ImportConfig(family=FAMILY, source=path, out=str(tmp_path / "o"), preset="small"))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"inp.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(ValueError, match="matches no"):
        run_import(ImportConfig(family=FAMILY, source=str(bad), out=str(tmp_path / "o"), which="raw"))
    assert not (tmp_path / "o").exists()


def test_import_refuses_pickled_objects_without_trust(tmp_path):
    path, ema, _ = _release(tmp_path, extra={"args": Opaque()})
    with pytest.raises(ValueError, match="needs full unpickling") as e:
        run_import(ImportConfig(family=FAMILY, source=path, out=str(tmp_path / "o")))
    assert "trust-pickle" in str(e.value) and not (tmp_path / "o").exists()
    run_import(ImportConfig(family=FAMILY, source=path, out=str(tmp_path / "o"), trust_pickle=True))
    assert torch.equal(ck.load_state_dict(str(tmp_path / "o"))["inp.weight"], ema["inp.weight"])
    assert pickle.dumps(Opaque())     # the class itself is an ordinary picklable one


def test_streamed_files_read_by_safetensors(tmp_path):
    """Our header writer produces files the safetensors library reads back identically."""
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16),
               "c": torch.randn(2, dtype=torch.float64), "d": torch.tensor(True), "e": torch.zeros(0, 4)}
    writer = tf.ShardWriter(str(tmp_path / "x.safetensors"), [(k, v.dtype, tuple(v.shape))
                                                             for k, v in tensors.items()])
    for k in writer.order:
        writer.write(tensors[k].contiguous())
    digest = writer.close()
    assert digest == st.sha256_uri(str(tmp_path / "x.safetensors"))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    metas = tf.read_header(str(tmp_path / "x.safetensors"))
    with tf.TensorReader(str(tmp_path)) as reader:
        assert all(torch.equal(reader.get(metas[k]), v) for k, v in tensors.items())
    assert json.loads(json.dumps(list(metas)))  # keys are plain strings
