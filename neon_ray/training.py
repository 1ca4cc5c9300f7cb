"""Pieces of a plain training step shared by pre-training and fine-tuning.

No Ray, no DeepSpeed: the Ray Train shell (``finetune``) and the single-process
pre-training loop (``pretrain``) both call these.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` that tracks its exponential moving average."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ (parameters); buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with a warm-up, min(decay, (1 + t) / (10 + t)).

    Without it, a short run's EMA is mostly the random initialisation (a
    0.999 EMA remembers ~1000 steps).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def make_optimizer(model: nn.Module | Iterable[Any], lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW (a torch optimizer, so DeepSpeed needs no fused-op build).

    ``model`` is a module or its parameters / parameter groups (what DeepSpeed
    hands an optimizer factory).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
