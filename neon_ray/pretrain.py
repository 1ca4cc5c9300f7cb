"""Pre-training a base model: how tests and the demo get one, offline.

No pretrained weights can be downloaded here, so ``neon-ray pretrain`` trains
a family preset on a real dataset (the bundled digits by default) with the
family's loss, AdamW with a linear warm-up, gradient clipping and an EMA, and
writes the EMA (sampling) weights as a checkpoint whose config records the
images seen. A finished output is reused when its settings match and refused
when they differ; it is never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from neon_ray import checkpoints, storage as st
from neon_ray.config import option, to_dict
from neon_ray.data.images import load_dataset
from neon_ray.families import get_family
from neon_ray.families.base import to_float
from neon_ray.storage import StorageConfig
from neon_ray.training import ema_decay_at, make_ema, make_optimizer, set_lr, update_ema, warmup_lr


@dataclass
class PretrainConfig:
    """Settings of ``neon-ray pretrain``."""

    out: str = option("", "output checkpoint folder (any storage URI)")
    family: str = option("flow", "model family: flow | edm | xar | package.module:Class")
    preset: str = option("tiny", "named model preset of the family")
    model: dict[str, Any] = option(default_factory=dict, help="overrides of preset fields")
    data: str = option("digits", "dataset: 'digits', an image folder or a Parquet URI")
    steps: int = option(3000, "optimizer steps", min=1)
    batch_size: int = option(128, "images per step", min=1)
    lr: float = option(2e-3, "AdamW learning rate after warm-up", min=0.0, min_exclusive=True)
    warmup_steps: int = option(200, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = option(1.0, "max gradient norm (0 = off)", min=0.0)
    ema_decay: float = option(0.999, "EMA decay per step (warmed up: min(decay, (1+t)/(10+t)))",
                              min=0.0, max=1.0)
    seed: int = option(0, "seed for initialisation, batches and noise")
    threads: int = option(0, "torch CPU threads (0 = torch default)", min=0)
    progress: bool = option(True, "show a progress bar")
    storage: StorageConfig = field(default_factory=StorageConfig)


def _settings(cfg: PretrainConfig) -> dict[str, Any]:
    data = to_dict(cfg)
    for key in ("out", "progress", "threads", "storage"):
        data.pop(key)
    return data


def run(cfg: PretrainConfig) -> str:
    """Train and write the checkpoint; returns its URI (reused when already done)."""
    # Validate everything cheap before training.
    if not cfg.out:
        raise ValueError("out: an output URI is required")
    family = get_family(cfg.family)
    model_cfg = family.model_config(cfg.preset, cfg.model)
    manifest = st.verify_manifest(cfg.out, cfg.storage)
    if manifest is not None:
        info = checkpoints.load_info(cfg.out, cfg.storage)
        if info.extra.get("pretrain") == _settings(cfg):
            print(f"pretrain: {cfg.out} already holds this model; nothing to do")
            return cfg.out
        raise FileExistsError(f"{cfg.out}: holds a checkpoint trained with other settings "
                              f"(never overwritten); choose another --out")
    st.check_writable(cfg.out, cfg.storage)
    images, labels = load_dataset(cfg.data, cfg.storage)
    expected = (model_cfg.channels, model_cfg.image_size, model_cfg.image_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"data: images of shape {tuple(images.shape[1:])} do not fit preset "
                         f"{cfg.preset!r} ({expected})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Build the model, optimizer and EMA.
    torch.manual_seed(cfg.seed)
    model = family.build(model_cfg).train()
    ema = make_ema(model)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = to_float(images)

    # Train.
    t0 = time.time()
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.family}/{cfg.preset}", disable=not cfg.progress,
               unit="step")
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        set_lr(opt, warmup_lr(step, cfg.lr, cfg.warmup_steps))
        loss = family.loss(model, x_all[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    seconds = time.time() - t0

    # Save the EMA (sampling) weights.
    seen = cfg.steps * cfg.batch_size
    info = checkpoints.CheckpointInfo(
        family=cfg.family, preset=cfg.preset, model=to_dict(model_cfg), weights="ema",
        images_seen=seen, base_train_images=seen,
        extra={"pretrain": _settings(cfg), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
               "train_seconds": round(seconds, 2)})
    checkpoints.save_checkpoint(cfg.out, ema.state_dict(), info, cfg.storage)
    print(f"pretrain: wrote {cfg.out} ({seen} images seen, {seconds:.1f} s, "
          f"final loss {info.extra['final_loss']:.4f})")
    return cfg.out
