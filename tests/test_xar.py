"""xAR family: official tensor layout, golden numerics, noisy context, sampler, tiny training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from neon_ray.data.digits import load_digits
from neon_ray.families import xar as xar_mod
from neon_ray.families.base import SamplerConfig, get_family, to_float
from neon_ray.families.vae import AutoencoderKL, VAEConfig
from neon_ray.families.xar_net import KVCache, grid_to_seq, seq_to_grid

# The project's shared folder sits beside the repository (../shared); override with NEON_RAY_XAR_REFERENCE.
SHARED = Path(os.environ.get("NEON_RAY_XAR_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "xar"))
GOLDEN = SHARED / "golden"
needs_shared = pytest.mark.skipif(not (SHARED / "official_state_dict_manifest.json").exists(),
                                  reason=f"needs the xAR reference files in {SHARED}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP stalls on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family():
    return get_family("xar")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((SHARED / "official_state_dict_manifest.json").read_text())


def _perturbed(net: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """The net with every parameter moved off its (partly zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _compare_with_manifest(module: nn.Module, entry: dict) -> None:
    params = {n for n, _ in module.named_parameters()}
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), "param" if k in params else "buffer")
            for k, v in module.state_dict().items()}
    theirs = {k: (tuple(v["shape"]), v["dtype"], v["kind"]) for k, v in entry["tensors"].items()}
    assert sorted(set(theirs) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(theirs)) == [], "extra"
    assert [k for k in ours if ours[k] != theirs[k]] == [], "mismatched shape/dtype/kind"
    assert sum(p.numel() for p in module.parameters()) == entry["num_params"]


# 1. Official names and shapes --------------------------------------------------
@needs_shared
@pytest.mark.parametrize("preset,official", [("B", "xar_base"), ("L", "xar_large"), ("H", "xar_huge")])
def test_presets_match_official_state_dict(family, manifest, preset, official):
    with torch.device("meta"):
        net = family.build(family.model_config(preset))
    _compare_with_manifest(net, manifest[official])


@needs_shared
def test_vae_matches_official_state_dict(manifest):
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    _compare_with_manifest(vae, manifest["vae_kl16"])


# 2. Golden equivalence ---------------------------------------------------------
@pytest.fixture(scope="module")
def golden(family):
    cfg = json.loads((GOLDEN / "golden.json").read_text())["config"]
    config = family.model_config("B", {
        "width": cfg["encoder_embed_dim"], "encoder_depth": cfg["encoder_depth"],
        "decoder_depth": cfg["decoder_depth"], "heads": cfg["encoder_num_heads"],
        "mlp_ratio": cfg["mlp_ratio"], "image_size": cfg["img_size"]})
    net = family.build(config)
    weights = load_file(GOLDEN / "golden_weights.safetensors")
    io = load_file(GOLDEN / "golden_io.safetensors")
    return net, weights, io


@needs_shared
def test_fresh_buffers_equal_official(family, golden):
    net, weights, _ = golden
    fresh = family.build(net.xar_config)
    for key, buf in fresh.state_dict().items():
        if key == "mask" or ".rope." in key:
            torch.testing.assert_close(buf, weights[key], rtol=0, atol=1e-6, msg=key)


@needs_shared
def test_golden_velocity_and_loss(golden):
    net, weights, io = golden
    net.load_state_dict(weights, strict=True)
    b = io["labels"].shape[0]
    t = io["t"].view(4, b).T                                          # (B, cells)
    noise = io["noise"].permute(1, 0, 2, 3).reshape(b, 256, 16)       # (B, L, C) cell order
    x = grid_to_seq(io["latents"], 2, 2)
    x_t, _ = xar_mod.noisy_context(x, t, noise)
    torch.testing.assert_close(x_t, io["x_t"], rtol=0, atol=1e-6)
    with torch.no_grad():
        cond = net.condition(t, io["labels"]).permute(1, 0, 2).reshape(4 * b, -1)
        torch.testing.assert_close(cond, io["condition"], rtol=0, atol=1e-5)
        v = net(io["x_t"], t, io["labels"])
        assert (v - io["velocity"]).abs().max().item() < 1e-5
        loss = xar_mod.flow_matching_loss(net, x, io["labels"], t, noise)
    assert abs(loss.item() / io["loss"].item() - 1) < 1e-6


@needs_shared
def test_golden_vae():
    cfg = json.loads((GOLDEN / "vae_golden.json").read_text())
    vae = AutoencoderKL(VAEConfig(embed_dim=cfg["embed_dim"], ch_mult=tuple(cfg["ch_mult"]))).eval()
    vae.load_state_dict(load_file(GOLDEN / "vae_golden_weights.safetensors"), strict=True)
    assert sum(p.numel() for p in vae.parameters()) == cfg["num_params"]
    io = load_file(GOLDEN / "vae_golden_io.safetensors")
    with torch.no_grad():
        mean, logvar = vae.encode(io["image"])
        decoded = vae.decode(io["z"])
    for ours, name in ((mean, "mean"), (logvar, "logvar"), (decoded, "decoded")):
        assert (ours - io[name]).abs().max().item() < 1e-5, name


# 3. Noisy context learning and causal sampling --------------------------------
@pytest.fixture(scope="module")
def tiny(family):
    torch.manual_seed(0)
    return _perturbed(family.build(family.model_config("tiny")))


class _Spy(nn.Module):
    """Wraps a network (as DDP would, via ``.module``) and records its inputs."""

    def __init__(self, net):
        super().__init__()
        self.module, self.calls = net, []

    def forward(self, x_t, t, labels):
        self.calls.append((x_t.detach(), t.detach(), labels))
        return self.module(x_t, t, labels)


def test_training_draws_one_time_per_cell(family, tiny):
    images, labels = load_digits()
    x = to_float(images[:512])
    spy = _Spy(tiny)
    with torch.no_grad():
        family.loss(spy, x, labels[:512])
    x_t, t, used_labels = spy.calls[0]
    assert t.shape == (512, 4)
    assert (t.std(dim=1) > 1e-3).float().mean() > 0.95          # cells differ within an image
    # Each cell is interpolated with its own time: the implied noise is N(0, 1) per cell.
    clean = grid_to_seq(x, 2, 2)
    tok = t.repeat_interleave(16, dim=1)[..., None]
    eps = (x_t - (1 - tok) * clean) / tok
    keep = tok.expand_as(eps) > 0.05
    assert 0.9 < eps[keep].std().item() < 1.1
    for k in range(4):
        cell_eps = eps[:, 16 * k:16 * (k + 1)][keep[:, 16 * k:16 * (k + 1)]]
        assert 0.85 < cell_eps.std().item() < 1.15
    dropped = (used_labels == 10).float().mean().item()        # label drop p = 0.1
    assert 0.03 < dropped < 0.2


def test_noisy_context_formula():
    x, noise = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    t = torch.tensor([[0.1, 0.9], [0.5, 0.25]])
    x_t, target = xar_mod.noisy_context(x, t, noise)
    for b in range(2):
        for k in range(2):
            s = slice(4 * k, 4 * k + 4)
            torch.testing.assert_close(x_t[b, s], (1 - t[b, k]) * x[b, s] + t[b, k] * noise[b, s])
    torch.testing.assert_close(target, noise - x)


def test_network_is_block_causal(tiny):
    x, t, y = torch.randn(2, 64, 1), torch.rand(2, 4), torch.tensor([3, 10])
    with torch.no_grad():
        base = tiny(x, t, y)
        later = x.clone()
        later[:, 48:] += 1.0
        t_later = t.clone()
        t_later[:, 3] = 0.5
        changed = tiny(later, t_later, y)
    assert torch.equal(changed[:, :48], base[:, :48])
    assert (changed[:, 48:] - base[:, 48:]).abs().max() > 1e-3


def test_kv_cache_matches_full_sequence(tiny):
    x, t, y = torch.randn(3, 64, 1), torch.rand(3, 4), torch.tensor([0, 4, 10])
    with torch.no_grad():
        full = tiny(x, t, y)
        cache = KVCache()
        parts = [tiny(x[:, :16], t[:, :1], y, 0, cache)]  # cell 0 alone: nothing committed
        for k in range(1, 4):  # cell k-1 enters again with cell k; only k-1 is committed
            parts.append(tiny(x[:, 16 * (k - 1):16 * (k + 1)], t[:, k - 1:k + 1], y, k - 1, cache,
                              commit_cells=1)[:, 16:])
        with pytest.raises(ValueError, match="KV cache"):
            tiny(x[:, :16], t[:, :1], y, 0, cache)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def _fixed_noise(n: int, seed: int, bump_cell: int | None = None):
    draws: dict[tuple[int, int], torch.Tensor] = {}

    def noise(cell: int, i: int) -> torch.Tensor:
        if (cell, i) not in draws:
            g = torch.Generator().manual_seed(seed * 1000 + cell * 100 + i)
            draws[(cell, i)] = torch.randn(n, 16, 1, generator=g)
        out = draws[(cell, i)]
        return out + 1.0 if cell == bump_cell else out
    return noise


@pytest.mark.parametrize("solver", ["euler_maruyama", "euler"])
def test_sampling_uses_only_earlier_cells(tiny, solver):
    labels = torch.tensor([1, 7])
    sampler = SamplerConfig(guidance=2.0, steps=4, solver=solver)
    base = xar_mod.sample_tokens(tiny, labels, _fixed_noise(2, 0), sampler)
    late = xar_mod.sample_tokens(tiny, labels, _fixed_noise(2, 0, bump_cell=3), sampler)
    early = xar_mod.sample_tokens(tiny, labels, _fixed_noise(2, 0, bump_cell=1), sampler)
    assert torch.equal(base[:, :48], late[:, :48])
    assert (base[:, 48:] - late[:, 48:]).abs().max() > 1e-3
    assert torch.equal(base[:, :16], early[:, :16])
    assert (base[:, 32:] - early[:, 32:]).abs().max() > 1e-3   # later cells see cell 1


def _reference_sampler(net, labels, noise, sampler):
    """No KV cache: every step re-runs all clean cells (t = 0) plus the noisy one."""
    null = torch.full_like(labels, net.num_classes)
    ts, cells = xar_mod.time_grid(sampler.steps), []
    for k in range(4):
        gamma = (sampler.guidance - 1) * k / 3 + 1
        x = noise(k, 0)
        for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            seq = torch.cat([*cells, x], 1)
            times = torch.tensor([0.0] * k + [t_cur]).expand(len(labels), k + 1)
            v_c, v_u = (net(seq, times, y)[:, -16:] for y in (labels, null))
            v = v_u + gamma * (v_c - v_u)
            score = -(x + (1 - t_cur) * v) / t_cur
            x = x + (v - t_cur * score) * (t_next - t_cur)   # g = 2t
            if i < len(ts) - 2:
                x = x + (2 * t_cur * abs(t_next - t_cur)) ** 0.5 * noise(k, i + 1)
        cells.append(x)
    return torch.cat(cells, 1)


def test_cached_sampler_matches_reference(tiny):
    labels, sampler = torch.tensor([2, 9]), SamplerConfig(guidance=3.0, steps=5, solver="euler_maruyama")
    with torch.no_grad():
        ours = xar_mod.sample_tokens(tiny, labels, _fixed_noise(2, 1), sampler)
        ref = _reference_sampler(tiny, labels, _fixed_noise(2, 1), sampler)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


# 4. The tiny preset and the family surface ------------------------------------
def test_tiny_preset(family):
    cfg = family.model_config("tiny")
    net = family.build(cfg)
    assert (cfg.image_size, cfg.channels, cfg.num_classes, cfg.tokenizer) == (8, 1, 10, "identity")
    assert (net.num_cells, net.cell_len, net.token_dim) == (4, 16, 1)
    assert 64 <= cfg.width <= 128 and (cfg.encoder_depth, cfg.decoder_depth) == (2, 2)
    assert cfg.label_drop == 0.1 and net.class_emb.num_embeddings == 11
    s = family.default_sampler(cfg)
    assert s.solver == "euler_maruyama" and 1.5 <= s.guidance <= 3 and 8 <= s.steps <= 16
    assert family.default_sampler(family.model_config("B")).guidance == 2.7


def test_sample_is_per_seed(family, tiny):
    s = SamplerConfig(guidance=2.0, steps=6, solver="euler_maruyama")
    batch = family.sample(tiny, torch.tensor([0, 3, -1, 5]), torch.tensor([10, 11, 12, 13]), s)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 1, 8, 8)
    alone = family.sample(tiny, torch.tensor([-1]), torch.tensor([12]), s)
    other = family.sample(tiny, torch.tensor([5, -1]), torch.tensor([13, 12]), s)
    assert torch.equal(alone[0], batch[2]) and torch.equal(other[1], batch[2])
    assert torch.equal(other[0], batch[3])
    assert not torch.equal(batch[0], batch[1])


def test_guidance_ramp(tiny, monkeypatch):
    seen = []
    real = xar_mod._cell_velocity

    def spy(net, x, t, y, cell, cache, context, gamma):
        seen.append((cell, gamma))
        return real(net, x, t, y, cell, cache, context, gamma)
    monkeypatch.setattr(xar_mod, "_cell_velocity", spy)
    xar_mod.sample_tokens(tiny, torch.tensor([1]), _fixed_noise(1, 0),
                          SamplerConfig(guidance=4.0, steps=2, solver="euler"))
    assert dict(seen) == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}


def test_bad_inputs(family, tiny):
    with pytest.raises(ValueError, match="solver"):
        family.check_sampler(SamplerConfig(solver="heun"))
    with pytest.raises(ValueError, match="images"):
        family.loss(tiny, torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        family.sample(tiny, torch.tensor([10]), torch.tensor([0]), SamplerConfig())
    with pytest.raises(ValueError, match="heads"):
        family.model_config("tiny", {"heads": 3})
    latent = family.build(family.model_config("B", {"width": 32, "heads": 2, "encoder_depth": 1,
                                                    "decoder_depth": 1}))
    with pytest.raises(ValueError, match="model.vae_weights"):
        family.sample(latent, torch.tensor([1]), torch.tensor([0]), SamplerConfig(steps=1))


@needs_shared
def test_latent_model_samples_through_vae(family):
    cfg = family.model_config("B", {"image_size": 32, "vae_ch_mult": [1, 2], "width": 32, "heads": 2,
                                    "encoder_depth": 1, "decoder_depth": 1,
                                    "vae_weights": str(GOLDEN / "vae_golden_weights.safetensors")})
    net = _perturbed(family.build(cfg))
    assert net.grid == (16, 16) and net.token_dim == 16
    images = family.sample(net, torch.tensor([1, 2]), torch.tensor([0, 1]), SamplerConfig(steps=2))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    loss = family.loss(net, torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([1, 2]))
    assert torch.isfinite(loss)


def test_grid_sequence_roundtrip():
    grid = torch.arange(2 * 3 * 8 * 8.0).view(2, 3, 8, 8)
    seq = grid_to_seq(grid, 2, 2)
    assert torch.equal(seq[0, :4, 0], grid[0, 0, 0, :4])         # cell 0, first row
    assert torch.equal(seq[0, 16:20, 0], grid[0, 0, 0, 4:])       # cell 1 = top-right block
    assert torch.equal(seq_to_grid(seq, 8, 8, 2, 2), grid)


# 5. Merge keys -------------------------------------------------------------------
def test_buffer_keys_are_mask_and_rope(family):
    with torch.device("meta"):
        net = family.build(family.model_config("B"))
    keys = family.buffer_keys(net)
    rope = {f"{s}_blocks.{i}.attn.rope.{n}" for s in ("encoder", "decoder") for i in range(8)
            for n in ("freqs", "freqs_cos", "freqs_sin")}
    assert keys == {"mask"} | rope
    assert not keys & {n for n, _ in net.named_parameters()}


# 6. The tiny model learns ----------------------------------------------------------
def test_tiny_loss_drops_on_digits(family):
    torch.manual_seed(0)
    net = family.build(family.model_config("tiny"))
    images, labels = load_digits()
    x = to_float(images)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,))
        loss = family.loss(net, x[idx], labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
