"""A small CNN classifier for 8×8 digits whose penultimate layer is a feature space.

It stands in for Inception on the bundled digits (demo, tests): trained for a
few seconds on CPU, deterministically, and its 64-dimensional pre-activation
penultimate layer gives features for FID and precision/recall — the same idea
as FID's use of Inception's pool layer. Torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """conv 32 → conv 64 → pool → conv 64 → pool → fc 64 (features) → fc 10."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, 8, 8) float in [-1, 1] → features (N, feature_dim), before the ReLU."""
        h = F.relu(self.conv1(x))                   # (N, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 64, 4, 4)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (N, 64, 2, 2)
        return self.fc(h.flatten(1))                # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, 8, 8) float in [-1, 1] → class logits (N, num_classes)."""
        return self.head(F.relu(self.features(x)))


def train_digits_net(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 12,
                     batch_size: int = 64, lr: float = 2e-3) -> DigitsNet:
    """Train a :class:`DigitsNet` on uint8 images (N, 1, 8, 8) and labels (N,).

    Deterministic: the initialisation and batch order come from ``seed`` only,
    and training runs on CPU in one thread (a multi-threaded reduction could
    round differently), leaving the caller's RNG state and thread count as
    they were.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images: expected uint8 (N, 1, 8, 8), got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    y = labels.long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsNet()
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], batch_size):
                    idx = order[i:i + batch_size]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Classification accuracy on uint8 images (N, 1, 8, 8)."""
    logits = model(images.float() / 127.5 - 1.0)
    return float((logits.argmax(1) == labels).float().mean())
