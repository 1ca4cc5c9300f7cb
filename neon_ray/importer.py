"""``neon-ray import``: turn an official ``.pth``/``.pt`` release into a neon_ray checkpoint.

The file is read with ``torch.load(weights_only=True)`` only (a file that
needs full unpickling is refused unless ``trust_pickle`` is set; see
:func:`neon_ray.checkpoints.load_official_state_dict`), its keys are mapped by
the family's ``import_state_dict``, and every key and shape is checked against
the family's network for the preset (built on the meta device, so nothing is
allocated) before anything is written. Float tensors are stored in the
network's own dtype (an fp16 release becomes fp32, losslessly), so a
fine-tuned snapshot and its imported base merge without a dtype mismatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from neon_ray import checkpoints as ck
from neon_ray import storage as st
from neon_ray.config import option, to_dict
from neon_ray.families.base import Family, get_family
from neon_ray.merge import check_output_free, name_list
from neon_ray.storage import StorageConfig


@dataclass
class ImportConfig:
    """``neon-ray import``: an official release → a checkpoint folder."""

    family: str = option(help="family name (flow, edm, xar) or package.module:Class")
    source: str = option(help="official .pth/.pt file (local path or URI)")
    out: str = option(help="output checkpoint folder (must not exist or be empty)")
    which: Literal["ema", "raw"] = option("ema", "take the EMA or the raw weights from the release")
    trust_pickle: bool = option(False, "allow full unpickling (runs code from the file; trusted "
                                       "sources only)")
    preset: str | None = option(None, "the family preset the release matches (default: the one "
                                      "preset whose keys and shapes match)")
    storage: StorageConfig = option(default_factory=StorageConfig, help="object-storage settings")
    max_shard_bytes: int = option(ck.DEFAULT_SHARD_BYTES, "largest output weight file, bytes", min=1)


def expected_tensors(family: Family, config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the family's network for ``config`` (built on meta)."""
    with torch.device("meta"):
        model = family.build(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def mismatch(expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
             state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` does not fit ``expected`` (keys, then the first shape), or None."""
    missing, extra = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or extra:
        return f"missing [{name_list(missing)}], extra [{name_list(extra)}]"
    for key in sorted(expected):
        if tuple(state_dict[key].shape) != expected[key][0]:
            return (f"tensor {key!r} has shape {list(state_dict[key].shape)}, the network "
                    f"expects {list(expected[key][0])}")
    return None


def match_preset(family: Family, preset: str | None,
                 state_dict: dict[str, torch.Tensor]) -> tuple[str, Any]:
    """The preset (given, or the single one that fits) and its config; ValueError otherwise."""
    names = [preset] if preset is not None else list(family.presets)
    fits, why = [], {}
    for name in names:
        config = family.model_config(name)
        reason = mismatch(expected_tensors(family, config), state_dict)
        if reason is None:
            fits.append((name, config))
        else:
            why[name] = reason
    if preset is not None and not fits:
        raise ValueError(f"release does not match preset {preset!r}: {why[preset]}")
    if not fits:
        closest = min(why, key=lambda n: len(why[n]))
        raise ValueError(f"release matches no {family.name!r} preset (closest {closest!r}: "
                         f"{why[closest]}); pass --preset to see one preset's differences")
    if len(fits) > 1:
        raise ValueError(f"release matches several presets ({', '.join(n for n, _ in fits)}); "
                         f"pass --preset")
    return fits[0]


def run_import(cfg: ImportConfig) -> dict[str, Any]:
    """Import ``cfg.source``; returns the written checkpoint's manifest."""
    family = get_family(cfg.family)
    check_output_free(cfg.out, cfg.storage)
    # Read the release (never unpickling code unless trusted).
    path, temp = st.local_copy(cfg.source, cfg.storage)
    try:
        source_sha = st.sha256_uri(path)
        state_dict = ck.load_official_state_dict(path, cfg.which, cfg.trust_pickle)
    finally:
        if temp:
            os.unlink(path)
    state_dict = family.import_state_dict(state_dict)
    # Check keys and shapes against the network, then store in its dtypes.
    preset, config = match_preset(family, cfg.preset, state_dict)
    expected = expected_tensors(family, config)
    tensors = {}
    for key, t in state_dict.items():
        dtype = expected[key][1] if t.is_floating_point() and expected[key][1].is_floating_point \
            else t.dtype
        tensors[key] = t.detach().to(dtype).clone().contiguous()   # clone: no shared storage
    info = ck.CheckpointInfo(family=cfg.family, model=to_dict(config), preset=preset, weights=cfg.which,
                             extra={"import": {"source": cfg.source, "sha256": source_sha}})
    return ck.save_checkpoint(cfg.out, tensors, info, cfg.storage, cfg.max_shard_bytes)
