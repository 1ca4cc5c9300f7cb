"""The flow and edm families: presets, losses, samplers, per-sample seeding, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neon_ray.config import ConfigError
from neon_ray.data.digits import load_digits
from neon_ray.families.base import SampleRNG, SamplerConfig, get_family, to_float, to_uint8
from neon_ray.families.edm import EDMConfig, denoise, time_steps
from neon_ray.families.nets import Denoiser, call_chunked, guided, net_config

FAMILIES = ["flow", "edm"]


def randomized(name: str, **overrides) -> torch.nn.Module:
    """A tiny network whose zero-initialised layers are perturbed, so outputs depend on
    every input (a freshly built net outputs exactly 0)."""
    family = get_family(name)
    torch.manual_seed(0)
    net = family.build(family.model_config("tiny", overrides))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def sampler(**kw) -> SamplerConfig:
    return dataclasses.replace(SamplerConfig(guidance=1.5, steps=4, solver="heun"), **kw)


# Presets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_presets_build_with_expected_sizes(name):
    family = get_family(name)
    tiny = family.build(family.model_config("tiny"))
    n_tiny = sum(p.numel() for p in tiny.parameters())
    with torch.device("meta"):  # full size without allocating memory
        big = family.build(family.model_config("cifar10"))
        out = big(torch.zeros(2, 3, 32, 32), torch.zeros(2), torch.tensor([1, -1]))
    assert out.shape == (2, 3, 32, 32)
    n_big = sum(p.numel() for p in big.parameters())
    print(f"{name}: tiny {n_tiny / 1e6:.3f}M params, cifar10 {n_big / 1e6:.1f}M params")
    assert 50_000 < n_tiny < 1_000_000
    assert 50e6 < n_big < 65e6  # DDPM++ CIFAR-10 is ~56M in EDM
    x = torch.zeros(2, 1, 8, 8)
    assert tiny(x, torch.rand(2), torch.tensor([3, -1])).shape == (2, 1, 8, 8)
    # No buffers: every state-dict key is a parameter that Neon extrapolates.
    assert family.buffer_keys(tiny) == set()
    assert set(tiny.state_dict()) == {k for k, _ in tiny.named_parameters()}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("overrides, field", [
    ({"attn_resolutions": [3]}, "attn_resolutions"),
    ({"channel_mult": []}, "channel_mult"),
    ({"width": 12}, "width"),
    ({"image_size": 10, "channel_mult": [1, 2, 2]}, "image_size"),
    ({"depth": 3}, "depth"),
])
def test_bad_model_config_names_field(name, overrides, field):
    with pytest.raises(ConfigError, match=field):
        get_family(name).model_config("tiny", overrides)


def test_edm_config_rejects_inverted_sigma_range():
    with pytest.raises(ConfigError, match="sigma_min"):
        get_family("edm").model_config("tiny", {"sigma_min": 100.0})


# Training --------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_finite_and_decreases_on_digits(name):
    family = get_family(name)
    torch.manual_seed(0)
    net = family.build(family.model_config("tiny"))
    images, labels = load_digits()
    x, y = to_float(images), labels
    probe_x, probe_y = x[:256], y[:256]

    def probe_loss() -> float:  # the same t/σ, noise and label drops every time
        torch.manual_seed(123)
        with torch.no_grad():
            return family.loss(net, probe_x, probe_y).item()

    before = probe_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = family.loss(net, x[idx], y[idx])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe_loss()
    assert after < 0.7 * before, (before, after)


# Sampling --------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw", [("flow", {"solver": "euler"}), ("flow", {"solver": "heun"}),
                                      ("edm", {"solver": "heun"}), ("edm", {"solver": "euler"}),
                                      ("edm", {"churn": 10.0, "guidance": 1.0})])
def test_sample_shape_and_dtype(name, kw):
    net = randomized(name)
    out = get_family(name).sample(net, torch.tensor([0, 5, -1]), torch.tensor([1, 2, 3]), sampler(**kw))
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.uint8
    assert out.float().std() > 0  # not a constant image
    empty = get_family(name).sample(net, torch.zeros(0, dtype=torch.long),
                                    torch.zeros(0, dtype=torch.long), sampler(**kw))
    assert empty.shape == (0, 1, 8, 8) and empty.dtype == torch.uint8


@pytest.mark.parametrize("name, kw", [("flow", {}), ("flow", {"solver": "euler", "guidance": 1.0}),
                                      ("edm", {"churn": 10.0})])
@pytest.mark.parametrize("chunk", [4, 64])
def test_images_do_not_depend_on_batch_size(name, kw, chunk):
    family, net = get_family(name), randomized(name, sample_chunk=chunk)
    seeds = torch.arange(8) * 7919 + 5
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])
    s = sampler(**kw)
    whole = family.sample(net, labels, seeds, s)
    for size in (1, 3):
        parts = [family.sample(net, labels[i:i + size], seeds[i:i + size], s)
                 for i in range(0, 8, size)]
        assert torch.equal(torch.cat(parts), whole), f"batch size {size}"
    # Different seeds give different images.
    assert not torch.equal(family.sample(net, labels, seeds + 1, s), whole)


def test_guided_network_output_is_bitwise_batch_invariant():
    """The design property behind the test above, at float level: a row's output is the
    same bits whatever batch it is evaluated in (fixed-shape chunks)."""
    net = randomized("flow", sample_chunk=4)
    torch.manual_seed(1)
    x, t, y = torch.randn(7, 1, 8, 8), torch.rand(7), torch.randint(-1, 10, (7,))
    whole = guided(net, x, t, y, 2.0)
    for rows in ([0], [1, 2, 3], [6, 0], [5, 4, 3, 2, 1]):
        assert torch.equal(guided(net, x[rows], t[rows], y[rows], 2.0), whole[rows])


def test_call_chunked_pads_and_trims():
    calls = []

    def fn(a, b):
        calls.append(a.shape[0])
        return a + b

    a, b = torch.arange(10.0), torch.ones(10)
    assert torch.equal(call_chunked(fn, 4, a, b), a + 1)
    assert calls == [4, 4, 4]


def test_guidance_mixes_conditional_and_null_outputs():
    net = randomized("flow")
    torch.manual_seed(2)
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 3, 4])
    null = torch.full_like(y, 10)
    cond = call_chunked(net, 64, x, t, y)
    uncond = call_chunked(net, 64, x, t, null)
    assert torch.equal(guided(net, x, t, y, 1.0), cond)
    assert torch.equal(guided(net, x, t, y, 0.0), uncond)
    torch.testing.assert_close(guided(net, x, t, y, 2.5), uncond + 2.5 * (cond - uncond))


@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_one_skips_the_null_pass(name):
    family, net = get_family(name), randomized(name)
    labels, seeds = torch.tensor([1, 7, 3]), torch.tensor([10, 11, 12])
    base = {g: family.sample(net, labels, seeds, sampler(guidance=g)) for g in (1.0, 2.0)}
    with torch.no_grad():
        net.map_label.weight[10].add_(1.0)  # change only the null label's embedding
    assert torch.equal(family.sample(net, labels, seeds, sampler(guidance=1.0)), base[1.0])
    assert not torch.equal(family.sample(net, labels, seeds, sampler(guidance=2.0)), base[2.0])


def test_flow_guidance_one_equals_conditional_euler_reference():
    family, net = get_family("flow"), randomized("flow")
    labels, seeds = torch.tensor([2, 9]), torch.tensor([3, 4])
    got = family.sample(net, labels, seeds, sampler(guidance=1.0, solver="euler", steps=5,
                                                      temperature=0.8))
    x = 0.8 * SampleRNG(seeds).randn(1, 8, 8)
    grid = torch.linspace(1.0, 0.0, 6, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = x + (t_next - t) * call_chunked(net, 64, x, torch.full((2,), t), labels)
    assert torch.equal(got, to_uint8(x))


def test_flow_with_zero_velocity_returns_scaled_initial_noise():
    family = get_family("flow")
    net = family.build(family.model_config("tiny"))  # output conv is zero-initialised: v = 0
    seeds = torch.tensor([5, 6, 7])
    out = family.sample(net, torch.tensor([0, 1, 2]), seeds, sampler(temperature=0.5))
    assert torch.equal(out, to_uint8(0.5 * SampleRNG(seeds).randn(1, 8, 8)))


def test_edm_preconditioning_and_time_steps():
    cfg = EDMConfig()
    t = time_steps(cfg, 18)
    assert len(t) == 19 and t[-1] == 0.0
    assert t[0] == pytest.approx(80.0) and t[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(t, t[1:]))
    assert time_steps(cfg, 1) == [80.0, 0.0]
    # With F = 0 (fresh net), D(x; σ) = c_skip(σ)·x = σ_data² / (σ² + σ_data²)·x (Table 1).
    net = get_family("edm").build(get_family("edm").model_config("tiny"))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 0.5, 20.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(denoise(net, x, sigma, torch.tensor([0, 1, 2])),
                               c_skip[:, None, None, None] * x)


def test_net_config_through_wrappers():
    net = randomized("edm")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert net_config(Wrapper(Wrapper(net))) is net.config
    with pytest.raises(ValueError, match="model"):
        net_config(torch.nn.Linear(2, 2))
    assert isinstance(net, Denoiser)


# Refusals --------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, field", [
    ("flow", {"solver": "euler_maruyama"}, "solver"),
    ("edm", {"solver": "dpm"}, "solver"),
    ("flow", {"guidance": -1.0}, "guidance"),
    ("edm", {"guidance": float("nan")}, "guidance"),
    ("flow", {"steps": 0}, "steps"),
    ("edm", {"steps": 0}, "steps"),
    ("edm", {"temperature": 0.0}, "temperature"),
    ("flow", {"churn": 1.0}, "churn"),
    ("edm", {"churn": -1.0}, "churn"),
])
def test_check_sampler_names_the_field(name, kw, field):
    family = get_family(name)
    with pytest.raises(ValueError, match=f"sampler.{field}"):
        family.check_sampler(sampler(**kw))


@pytest.mark.parametrize("name", FAMILIES)
def test_default_sampler_is_accepted(name):
    family = get_family(name)
    family.check_sampler(family.default_sampler(family.model_config("tiny")))


@pytest.mark.parametrize("labels, seeds, match", [
    (torch.tensor([11]), torch.tensor([0]), "labels"),
    (torch.tensor([-2]), torch.tensor([0]), "labels"),
    (torch.tensor([1, 2]), torch.tensor([0]), "seeds"),
    (torch.tensor([1.0]), torch.tensor([0]), "integer"),
])
def test_sample_rejects_bad_labels_and_seeds(labels, seeds, match):
    family = get_family("flow")
    net = family.build(family.model_config("tiny"))
    with pytest.raises(ValueError, match=match):
        family.sample(net, labels, seeds, sampler())
