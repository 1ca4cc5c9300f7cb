"""The xAR network (Ren et al. 2025, "Beyond Next-Token: Next-X Prediction").

A flow-matching transformer over a sequence of continuous tokens that is cut
into *cells* (2×2 blocks of the token grid, 4 cells). Attention is block-causal
over cells, and every token is conditioned on its own cell's time: noisy
context learning trains all cells at once, each at its own noise level, and the
sampler then generates one cell at a time with a KV cache of the clean,
already generated cells.

State-dict names and shapes follow the official release (OliverRensu/xAR), so
its checkpoints load with ``strict=True``:

- encoder: ``z_proj`` → ``+encoder_pos_embed_learned`` → ``z_proj_ln`` (RMSNorm
  with weight) → ``encoder_blocks`` → ``encoder_norm``;
- decoder: ``decoder_embed`` → ``+decoder_pos_embed_learned`` →
  ``decoder_blocks`` → ``decoder_norm`` → ``pred`` (the velocity per token);
- condition per cell: ``class_emb`` (``num_classes + 1`` rows, the last the null
  label) + ``time_embed`` of ``⌊1000·t⌋``;
- a block: weightless RMSNorm, adaptive modulation ``ada_lin`` (SiLU, linear to
  6·width: gates, scales, shifts for the two branches), attention with fused
  ``qkv`` and 2-D rotary embeddings (buffers ``rope.freqs``/``freqs_cos``/
  ``freqs_sin``), a gated MLP (``fc1_g``, ``fc1_x``, ``fc2``; GELU gate);
- buffer ``mask`` (1, 1, L, L): 0 where a query may attend, −inf elsewhere.

Tokens are ordered cell by cell, row-major inside a cell.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6


def cell_order(grid_h: int, grid_w: int, cells_h: int, cells_w: int) -> torch.Tensor:
    """Raster index of each sequence position: cells row-major, tokens row-major in a cell.

    Returns int64 (grid_h·grid_w,): ``seq[i] = raster[order[i]]``.
    """
    ch, cw = grid_h // cells_h, grid_w // cells_w
    raster = torch.arange(grid_h * grid_w).view(cells_h, ch, cells_w, cw)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def grid_to_seq(x: torch.Tensor, cells_h: int, cells_w: int) -> torch.Tensor:
    """(N, C, H, W) token grid → (N, H·W, C) sequence in cell order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, cells_h, h // cells_h, cells_w, w // cells_w)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, c)


def seq_to_grid(x: torch.Tensor, h: int, w: int, cells_h: int, cells_w: int) -> torch.Tensor:
    """(N, H·W, C) sequence in cell order → (N, C, H, W) token grid."""
    n, _, c = x.shape
    x = x.reshape(n, cells_h, cells_w, h // cells_h, w // cells_w, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def block_causal_mask(num_cells: int, cell_len: int) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 where query cell ≥ key cell, −inf elsewhere."""
    cell = torch.arange(num_cells * cell_len) // cell_len
    allowed = cell[:, None] >= cell[None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (…, dim) = [cos(t·f), sin(t·f)], f_i = max_period^(−i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps), times a learned weight when ``affine``."""

    def __init__(self, dim: int, affine: bool = True, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight


class TimestepEmbedder(nn.Module):
    """⌊1000·t⌋ → 256 sinusoidal features → Linear, SiLU, Linear (DiT's embedder)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        steps = (t * 1000).long()  # the official model embeds the integer step
        return self.mlp(timestep_embedding(steps, self.freq_dim))


class Rope2D(nn.Module):
    """2-D rotary embedding (RoFormer, Su et al. 2021, applied per image axis).

    The first half of each head's channels rotates with the token's row, the
    second half with its column; channel pairs (2i, 2i+1) share frequency
    ``theta^(−2i/d)`` with d = head_dim/2. Tables are rows of the sequence (cell
    order): ``freqs_cos``/``freqs_sin`` (L, head_dim); ``freqs`` (head_dim/4,).
    """

    def __init__(self, head_dim: int, rows: torch.Tensor, cols: torch.Tensor, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2-D rope, got {head_dim}")
        d = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))          # (d/2,)
        rep = freqs.repeat_interleave(2)                                        # (d,)
        angles = torch.cat([rows.float()[:, None] * rep, cols.float()[:, None] * rep], -1)  # (L, hd)
        self.register_buffer("freqs", freqs)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (N, n, ..., head_dim), sequence positions start..start+n along dim 1."""
        n = x.shape[1]
        # Pair (x_2i, x_2i+1) as a complex number and rotate it by its angle:
        # out = x·cos + rot(x)·sin with rot(x)_(2i, 2i+1) = (−x_2i+1, x_2i).
        cos, sin = self.freqs_cos[start:start + n, 0::2], self.freqs_sin[start:start + n, 0::2]
        turn = torch.complex(cos, sin).view(n, *[1] * (x.dim() - 3), -1)      # (n, 1.., hd/2)
        pairs = x.float().unflatten(-1, (-1, 2))
        if pairs.stride(-1) != 1 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()
        return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2).to(x.dtype)


class KVCache:
    """Keys/values of already committed sequence positions, per attention layer."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # committed tokens (equal across layers after a forward)

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys.get(layer), self.values.get(layer)

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        old_k, old_v = self.get(layer)
        self.keys[layer] = k if old_k is None else torch.cat([old_k, k], 2)
        self.values[layer] = v if old_v is None else torch.cat([old_v, v], 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, rows: torch.Tensor, cols: torch.Tensor,
                 rope_theta: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rope = Rope2D(width // heads, rows, cols, rope_theta)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int,
                cache: KVCache | None, layer: int, commit: int) -> torch.Tensor:
        """x: (N, n, D) at positions start..; mask: (1, 1, n, start+n). Commits the first
        ``commit`` tokens' keys/values to ``cache``."""
        n_, n, d = x.shape
        qkv = self.qkv(x).view(n_, n, 3, self.heads, d // self.heads)
        q, k = self.rope(qkv[:, :, :2], start).permute(2, 0, 3, 1, 4)     # (N, heads, n, hd)
        v = qkv[:, :, 2].transpose(1, 2)                                  # (N, heads, n, hd)
        if cache is not None:
            old_k, old_v = cache.get(layer)
            if commit:
                cache.commit(layer, k[:, :, :commit], v[:, :, :commit])
            if old_k is not None:
                k, v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # (N, heads, n, hd)
        return self.proj(out.transpose(1, 2).reshape(n_, n, d))


class GatedMLP(nn.Module):
    """fc2(GELU(fc1_g x) ⊙ fc1_x x) (GLU variants, Shazeer 2020), hidden = ⌊2/3·ratio·width⌋.

    The layout of timm's ``SwiGLU``, but the official model gates with exact
    (erf) GELU, not SiLU; the golden outputs pin this down.
    """

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 / 3 * mlp_ratio * width)
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


class Block(nn.Module):
    """Pre-norm block modulated by its cell's condition c (VAR's AdaLN, Tian et al. 2024):

    x ← x + γ1 · Attn(norm(x)·(1 + s1) + b1);  x ← x + γ2 · MLP(norm(x)·(1 + s2) + b2),
    with (γ1, γ2, s1, s2, b1, b2) = ada_lin(c) and a weightless RMSNorm.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, rows: torch.Tensor,
                 cols: torch.Tensor, rope_theta: float):
        super().__init__()
        self.norm = RMSNorm(width, affine=False)
        self.attn = Attention(width, heads, rows, cols, rope_theta)
        self.mlp = GatedMLP(width, mlp_ratio)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, start: int,
                cache: KVCache | None, layer: int, commit: int) -> torch.Tensor:
        """x: (N, n, D) with n = cells·cell_len; cond: (N, cells, D)."""
        n_, n, d = x.shape
        cells = cond.shape[1]
        # (N, cells, 1, D) each: gates γ1, γ2, scales, shifts (VAR's AdaLN order).
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).unsqueeze(2).chunk(6, dim=-1)

        def per_cell(h: torch.Tensor) -> torch.Tensor:
            return h.view(n_, cells, n // cells, d)

        h = torch.addcmul(b1, per_cell(self.norm(x)), 1 + s1).view(n_, n, d)
        x = torch.addcmul(per_cell(x), per_cell(self.attn(h, mask, start, cache, layer, commit)), g1)
        h = torch.addcmul(b2, self.norm(x), 1 + s2).view(n_, n, d)
        return torch.addcmul(x, per_cell(self.mlp(h)), g2).view(n_, n, d)


class XARNet(nn.Module):
    """Velocity network v(x_t, t, y) over cells of continuous tokens.

    ``grid`` is the token grid (H, W); ``cells`` the cell grid (2, 2 for xAR);
    ``token_dim`` the channels per token (16 VAE latent channels, or 1 pixel).
    """

    def __init__(self, grid: tuple[int, int], cells: tuple[int, int], token_dim: int, width: int,
                 encoder_depth: int, decoder_depth: int, heads: int, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, rope_theta: float = 10000.0):
        super().__init__()
        gh, gw = grid
        if gh % cells[0] or gw % cells[1]:
            raise ValueError(f"token grid {grid} is not divisible into cells {cells}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.grid, self.cells, self.token_dim, self.num_classes = (gh, gw), tuple(cells), token_dim, num_classes
        self.num_cells = cells[0] * cells[1]
        self.cell_len = gh * gw // self.num_cells
        seq_len = gh * gw
        raster = cell_order(gh, gw, *cells)
        rows, cols = raster // gw, raster % gw                                  # (L,) each

        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.register_buffer("mask", block_causal_mask(self.num_cells, self.cell_len))
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.time_embed = TimestepEmbedder(width)
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = RMSNorm(width)
        self.encoder_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, rows, cols, rope_theta) for _ in range(encoder_depth))
        self.encoder_norm = RMSNorm(width)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, rows, cols, rope_theta) for _ in range(decoder_depth))
        self.decoder_norm = RMSNorm(width)
        self.pred = nn.Linear(width, token_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings, zero modulation and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.class_emb.weight):
            nn.init.normal_(p, std=0.02)
        for lin in self.time_embed.mlp[0::2]:
            nn.init.normal_(lin.weight, std=0.02)
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            nn.init.zeros_(block.ada_lin[1].weight)
            nn.init.zeros_(block.ada_lin[1].bias)
        nn.init.zeros_(self.pred.weight)

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, cells, D) = class embedding + timestep embedding. t: (N, cells); labels: (N,)."""
        return self.class_emb(labels)[:, None] + self.time_embed(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, start_cell: int = 0,
                cache: KVCache | None = None, commit_cells: int = 0) -> torch.Tensor:
        """Velocity (N, n, C) for tokens x (N, n, C) of cells start_cell..start_cell+k.

        t: (N, k) time per cell (0 clean, 1 noise); labels: (N,) in [0, num_classes]
        (num_classes = null). With a ``cache`` the cached positions must be exactly
        the tokens before ``start_cell``; the first ``commit_cells`` cells of x are
        appended to it.
        """
        n_, n, _ = x.shape
        cells = t.shape[1]
        start, end = start_cell * self.cell_len, (start_cell + cells) * self.cell_len
        if n != end - start or end > self.mask.shape[-1]:
            raise ValueError(f"x has {n} tokens; expected {cells} cells of {self.cell_len} "
                             f"from cell {start_cell} (sequence {self.mask.shape[-1]})")
        cached = 0 if cache is None else cache.length
        if cached != start:
            raise ValueError(f"KV cache holds {cached} tokens but the input starts at token {start}")
        mask = self.mask[:, :, start:end, :end].to(x.dtype)                      # (1, 1, n, end)
        cond = self.condition(t, labels)                                          # (N, k, D)
        commit = commit_cells * self.cell_len

        # Encoder.
        h = self.z_proj(x.to(self.z_proj.weight.dtype))
        h = h + self.encoder_pos_embed_learned[:, start:end]
        h = self.z_proj_ln(h)
        for i, block in enumerate(self.encoder_blocks):
            h = block(h, cond, mask, start, cache, i, commit)
        h = self.encoder_norm(h)
        # Decoder.
        h = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, start:end]
        offset = len(self.encoder_blocks)
        for i, block in enumerate(self.decoder_blocks):
            h = block(h, cond, mask, start, cache, offset + i, commit)
        if cache is not None:
            cache.length += commit
        return self.pred(self.decoder_norm(h))
