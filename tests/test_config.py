"""Strict typed configs: unknown keys, types, ranges, overrides, YAML."""

from dataclasses import dataclass, field

import pytest

from neon_ray import config as C
from neon_ray.families.base import SamplerConfig


@dataclass
class Inner:
    steps: int = C.option(4, "steps", min=1)
    name: str = C.option("a", "a name")


@dataclass
class Outer:
    lr: float = C.option(1e-3, "learning rate", min=0.0, min_exclusive=True)
    flag: bool = C.option(False, "a flag")
    maybe: int | None = C.option(None, "optional int")
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = C.option((1, 2), "sizes")


def test_defaults_and_nested_values():
    cfg = C.from_dict(Outer, {"lr": 2, "inner": {"steps": 8}, "sizes": [3, 4, 5]})
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)
    assert cfg.inner.steps == 8 and cfg.inner.name == "a"
    assert cfg.sizes == (3, 4, 5)
    assert C.from_dict(Outer, C.to_dict(cfg)) == cfg


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(C.ConfigError, match=r"unknown key 'inner.stpes' \(valid: steps, name\)"):
        C.from_dict(Outer, {"inner": {"stpes": 3}})


@pytest.mark.parametrize("data, message", [
    ({"lr": "fast"}, "lr: expected float, got 'fast'"),
    ({"inner": {"steps": 2.5}}, "inner.steps: expected int, got 2.5"),
    ({"flag": "yes"}, "flag: expected bool, got 'yes'"),
    ({"inner": {"steps": 0}}, "inner.steps: must be >= 1, got 0"),
    ({"lr": 0.0}, "lr: must be > 0.0, got 0.0"),
    ({"maybe": "x"}, "maybe: expected int, got 'x'"),
])
def test_wrong_type_or_range_names_field_and_value(data, message):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(Outer, data)
    assert str(e.value) == message


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\ninner:\n  name: b\n")
    cfg = C.load(Outer, path, ["inner.steps=9", "flag=true", "maybe=3"])
    assert (cfg.lr, cfg.inner.name, cfg.inner.steps, cfg.flag, cfg.maybe) == (0.5, "b", 9, True, 3)
    with pytest.raises(C.ConfigError, match="unknown key 'inner.nope'"):
        C.load(Outer, path, ["inner.nope=1"])
    with pytest.raises(C.ConfigError, match="not of the form key=value"):
        C.load(Outer, None, ["lr"])


def test_dump_round_trips():
    import yaml

    cfg = C.from_dict(Outer, {"inner": {"steps": 7}})
    assert C.from_dict(Outer, yaml.safe_load(C.dump(cfg))) == cfg


def test_sampler_config_ranges():
    with pytest.raises(C.ConfigError, match="guidance: must be >= 0.0, got -1"):
        C.from_dict(SamplerConfig, {"guidance": -1})
    with pytest.raises(C.ConfigError, match="steps: must be >= 1, got 0"):
        C.from_dict(SamplerConfig, {"steps": 0})
