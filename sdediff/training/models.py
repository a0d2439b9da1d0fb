r"""Small time-conditioned networks: an MLP for vectors and a UNet for images.

Both take ``(x, t)`` (and optionally class labels ``y``) and return a tensor shaped like ``x``; wrap
them in :class:`sdediff.score.ScoreModel` to get a ``score_fn`` for the samplers. The output layer is
zero-initialised, so a fresh ε-prediction network predicts 0 (the loss starts at :math:`E\|\varepsilon\|^2`).

Time embeddings map ``t`` (a ``(batch,)`` tensor) to ``dim`` features:

* ``"sinusoidal"`` (Transformer / DDPM): :math:`[\sin(c\,t\,\omega_k), \cos(c\,t\,\omega_k)]` with
  :math:`\omega_k = 10000^{-k/(d/2)}` and :math:`c = 1000` (``t`` in ``[0, 1]`` acts like a DDPM step index);
* ``"fourier"`` (random Fourier features, NCSN++): :math:`[\sin(2\pi t w_k), \cos(2\pi t w_k)]`,
  :math:`w_k \sim N(0, \text{scale}^2)` fixed at construction (drawn from a seeded generator, so two
  models built alike are identical).

Class conditioning (``num_classes=K``) adds a learned embedding from a table of ``K + 1`` entries; index
``K`` (:attr:`null_class`) is the "no label" token used for classifier-free guidance, and ``y=None``
means that token for every sample.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import batch_time
from .._validate import check_choice, check_float, check_int, check_ints, is_int

TIME_EMBEDDINGS = ("sinusoidal", "fourier")


class SinusoidalEmbedding(nn.Module):
    r"""Transformer-style embedding :math:`[\sin(c t \omega_k), \cos(c t \omega_k)]`, :math:`\omega_k = P^{-k/h}`.

    Parameters
    ----------
    dim : int
        Output features (even).
    scale : float
        :math:`c`, multiplies ``t`` first (1000 maps ``t`` in ``[0, 1]`` to DDPM's step range).
    max_period : float
        :math:`P`, the longest period.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        _check_even(dim, "embedding dim")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.scale = float(scale)

    def forward(self, t: Tensor) -> Tensor:
        args = self.scale * t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([args.sin(), args.cos()], dim=1)


class FourierEmbedding(nn.Module):
    r"""Random Fourier features :math:`[\sin(2\pi t w_k), \cos(2\pi t w_k)]`, :math:`w_k \sim N(0, \text{scale}^2)`.

    Parameters
    ----------
    dim : int
        Output features (even).
    scale : float
        Standard deviation of the frequencies.
    seed : int
        Seed of the generator drawing the (fixed, non-trainable) frequencies.
    """

    def __init__(self, dim: int, scale: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        _check_even(dim, "embedding dim")
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(dim // 2, generator=gen, device=gen.device) * scale  # drawn on the CPU, also under a meta device
        self.register_buffer("w", w)

    def forward(self, t: Tensor) -> Tensor:
        args = 2 * math.pi * t[:, None] * self.w.to(t.dtype)
        return torch.cat([args.sin(), args.cos()], dim=1)


def _check_even(n: int, name: str) -> None:
    if not (is_int(n) and n >= 2 and n % 2 == 0):
        raise ValueError(f"{name} must be an even integer >= 2, got {n!r}")


def time_embedding(kind: str, dim: int, fourier_scale: float = 4.0) -> nn.Module:
    """Build the time embedding ``kind`` (``"sinusoidal"`` or ``"fourier"``) with ``dim`` features."""
    if check_choice("time_embed", kind, TIME_EMBEDDINGS) == "sinusoidal":
        return SinusoidalEmbedding(dim)
    return FourierEmbedding(dim, scale=fourier_scale)


class _Conditioning(nn.Module):
    """Time embedding → MLP, plus an optional class embedding with a null token."""

    def __init__(self, kind: str, embed_dim: int, out_dim: int, num_classes: int | None, fourier_scale: float) -> None:
        super().__init__()
        self.embed = time_embedding(kind, embed_dim, fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        if num_classes is not None:
            check_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.classes = None if num_classes is None else nn.Embedding(num_classes + 1, out_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        emb = self.mlp(self.embed(batch_time(t, x)))
        if self.classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            elif y.shape != (x.shape[0],):
                raise ValueError(f"y must be a (batch,) tensor of class indices, got shape {tuple(y.shape)}")
            emb = emb + self.classes(y)
        elif y is not None:
            raise ValueError("y was given but the model was built without num_classes")
        return emb


class _ScoreNet(nn.Module):
    """What the score networks share: a :class:`_Conditioning` as ``self.cond`` and its class counts."""

    cond: _Conditioning

    @property
    def num_classes(self) -> int | None:
        """Number of classes (``None``: unconditional)."""
        return self.cond.num_classes

    @property
    def null_class(self) -> int | None:
        """Index of the "no label" token (``num_classes``), or ``None``."""
        return self.cond.num_classes


class MLP(_ScoreNet):
    r"""Residual MLP ``(x, t[, y]) -> tensor like x`` for vector data (non-batch dims are flattened).

    :math:`h_0 = W_{in} x + e`, then ``depth`` residual blocks
    :math:`h \leftarrow h + W_i\,\mathrm{SiLU}(h + E_i e)`, and a zero-initialised
    :math:`W_{out}\,\mathrm{SiLU}(h)`, where :math:`e` is the time (+ class) embedding.

    Parameters
    ----------
    dim : int
        Number of elements of one sample (``prod(x.shape[1:])``).
    hidden : int
        Width.
    depth : int
        Number of residual blocks.
    time_embed : {"fourier", "sinusoidal"}
        Time embedding (see the module notes).
    embed_dim : int
        Features of the raw time embedding.
    num_classes : int, optional
        Enables class conditioning with ``num_classes + 1`` embeddings (the last is the null token).
    fourier_scale : float
        Frequency scale of the ``"fourier"`` embedding.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_embed: str = "fourier", embed_dim: int = 64,
                 num_classes: int | None = None, fourier_scale: float = 4.0) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("hidden", hidden)
        check_int("depth", depth)
        self.config: dict[str, Any] = {"dim": dim, "hidden": hidden, "depth": depth, "time_embed": time_embed,
                                       "embed_dim": embed_dim, "num_classes": num_classes, "fourier_scale": fourier_scale}
        self.cond = _Conditioning(time_embed, embed_dim, hidden, num_classes, fourier_scale)
        self.inp = nn.Linear(dim, hidden)
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        if x.dim() < 1 or x[0].numel() != self.config["dim"]:
            raise ValueError(f"x must have shape (batch, ...) with {self.config['dim']} elements per sample, "
                             f"got {tuple(x.shape)}")
        emb = self.cond(x, t, y)
        h = self.inp(x.reshape(x.shape[0], -1)) + emb
        for proj, layer in zip(self.emb_proj, self.layers, strict=True):
            h = h + layer(F.silu(h + proj(emb)))
        return self.out(F.silu(h)).reshape(x.shape)


def _groups(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` not above ``groups`` (GroupNorm needs one)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class _Attention(nn.Module):
    r"""Self-attention over the :math:`HW` positions of a feature map, added to it:
    :math:`x + W_o\,\mathrm{softmax}(Q^\top K/\sqrt{d})\,V` per head, with :math:`Q, K, V` 1×1 convolutions of
    ``GroupNorm(x)``, :math:`d` = channels per head, and :math:`W_o` a zero-initialised 1×1 convolution (so the
    block starts as the identity). Written with plain matrix products, so it has every derivative a likelihood or
    a sliced score-matching loss asks for."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention_heads={heads} must divide the {channels} channels of every attention level")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(c // self.heads), dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float,
                 attention_heads: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = None if attention_heads is None else _Attention(cout, attention_heads, groups)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        out = self.skip(x) + h
        return out if self.attn is None else self.attn(out)


class _Down(nn.Conv2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=1)


class _Up(nn.Conv2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(_ScoreNet):
    r"""A small UNet ``(x, t[, y]) -> tensor like x`` for images ``(batch, C, H, W)``.

    ``len(channel_mults)`` resolution levels, ``num_res_blocks`` residual blocks per level on the way down
    (``+1`` on the way up, each fed a skip connection), stride-2 convolutions down, nearest-neighbour
    upsampling + convolution up, two residual blocks in the middle. Residual blocks are
    GroupNorm → SiLU → conv, plus a projection of the time (+ class) embedding, then GroupNorm → SiLU →
    dropout → zero-initialised conv. At the levels of ``attention_levels`` (0 is the input resolution, level
    ``i`` has :math:`H/2^i \times W/2^i` positions) every residual block is followed by a self-attention block
    with ``attention_heads`` heads, and so is the first middle block when the lowest level is among them (as in
    DDPM). ``H`` and ``W`` must be divisible by ``2**(len(channel_mults) - 1)``: ``(1, 2)`` suits 8×8 digits,
    ``(1, 2, 2)`` 28×28 or 32×32 images, ``(1, 2, 2, 2)`` 64×64. :func:`unet_config` picks all of these from the
    shape of the data.

    Parameters
    ----------
    in_channels : int
        Image channels.
    base_channels : int
        Channels at the first level; level ``i`` has ``base_channels * channel_mults[i]``.
    channel_mults : tuple of int
        Channel multipliers per level.
    num_res_blocks : int
        Residual blocks per level (down path).
    time_embed : {"sinusoidal", "fourier"}
        Time embedding (``base_channels`` features, then an MLP to ``4 * base_channels``).
    num_classes : int, optional
        Class conditioning with a null token (see the module notes).
    dropout : float
        Dropout inside residual blocks.
    groups : int
        GroupNorm groups (at most; reduced to a divisor of the channels).
    out_channels : int, optional
        Output channels (default ``in_channels``).
    fourier_scale : float
        Frequency scale of the ``"fourier"`` embedding.
    attention_levels : tuple of int
        Levels (``0 .. len(channel_mults) - 1``) with self-attention after each residual block; ``()``: none.
    attention_heads : int
        Heads of every attention block (they must divide its channels).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2),
                 num_res_blocks: int = 1, time_embed: str = "sinusoidal", num_classes: int | None = None,
                 dropout: float = 0.0, groups: int = 8, out_channels: int | None = None,
                 fourier_scale: float = 4.0, attention_levels: tuple[int, ...] = (), attention_heads: int = 1) -> None:
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (base_channels, "base_channels"),
                            (num_res_blocks, "num_res_blocks"), (groups, "groups"), (attention_heads, "attention_heads")):
            check_int(name, value)
        mults = check_ints("channel_mults", channel_mults)
        attention = tuple(sorted(set(check_ints("attention_levels", attention_levels, 0)))) if len(attention_levels) else ()
        if attention and attention[-1] >= len(mults):
            raise ValueError(f"attention_levels must lie in 0..{len(mults) - 1} (one per channel multiplier), got "
                             f"{tuple(attention_levels)!r}")
        dropout = check_float("dropout", dropout, 0, 1, high_open=True)
        _check_even(base_channels, "base_channels")
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels)
        self.config: dict[str, Any] = {
            "in_channels": in_channels, "base_channels": base_channels, "channel_mults": list(mults),
            "num_res_blocks": num_res_blocks, "time_embed": time_embed, "num_classes": num_classes,
            "dropout": dropout, "groups": groups, "out_channels": out_channels, "fourier_scale": fourier_scale,
            "attention_levels": list(attention), "attention_heads": attention_heads}
        emb_dim = 4 * base_channels
        self.cond = _Conditioning(time_embed, base_channels, emb_dim, num_classes, fourier_scale)
        self.inp = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def res(cin: int, cout: int, level: int) -> _ResBlock:
            return _ResBlock(cin, cout, emb_dim, groups, dropout, attention_heads if level in attention else None)

        ch, skips = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                self.down.append(res(ch, base_channels * mult, level))
                ch = base_channels * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(_Down(ch))
                skips.append(ch)
        lowest = len(mults) - 1
        self.mid = nn.ModuleList([res(ch, ch, lowest), res(ch, ch, -1)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(res(ch + skips.pop(), base_channels * mult, level))
                ch = base_channels * mult
            if level > 0:
                self.up.append(_Up(ch))
        self.out_norm = nn.GroupNorm(_groups(ch, groups), ch)
        self.out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._factor = 2 ** (len(mults) - 1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"x must have shape (batch, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self._factor or x.shape[3] % self._factor:
            raise ValueError(f"H and W must be divisible by {self._factor} for {len(self.config['channel_mults'])} "
                             f"levels, got {tuple(x.shape[2:])}")
        emb = self.cond(x, t, y)
        h = self.inp(x)
        hs = [h]
        for block in self.down:
            h = block(h) if isinstance(block, _Down) else block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(h) if isinstance(block, _Up) else block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def unet_config(sample_shape: tuple[int, ...], **overrides: Any) -> dict[str, Any]:
    r"""The :class:`UNet` arguments sdediff picks for images of ``sample_shape = (C, H, W)``, with ``overrides``
    (any :class:`UNet` argument) applied on top.

    With :math:`s = \min(H, W)`:

    * levels: 2 for :math:`s \le 12`, 3 for :math:`s \le 32`, 4 for :math:`s \le 64`, 5 above, fewer where
      :math:`H` or :math:`W` is not divisible by :math:`2^{\text{levels} - 1}`; ``channel_mults`` ``(1, 2, 2, ...)``;
    * ``base_channels`` 32 for :math:`s \le 12` (the 8×8 digits), else 16, one residual block per level: sized
      for training on a CPU (on a GPU, ``base_channels=64`` or more and ``num_res_blocks=2``);
    * self-attention at the lowest level (7×7 for 28×28 images, 8×8 for 32×32 and 64×64) for :math:`s \ge 16`,
      none for smaller images; one head;
    * dropout 0 (0.1 is usual for long runs on a small data set), the sinusoidal time embedding.

    Returns
    -------
    dict
        Keyword arguments of :class:`UNet` (``in_channels`` included); ``UNet(**unet_config(shape))`` builds it.
    """
    shape = check_ints("sample_shape", sample_shape)
    if len(shape) != 3:
        raise ValueError(f"sample_shape must be (C, H, W) for a UNet, got {tuple(sample_shape)!r}")
    c, h, w = shape
    side = min(h, w)
    levels = 2 if side <= 12 else 3 if side <= 32 else 4 if side <= 64 else 5
    while levels > 1 and (h % 2 ** (levels - 1) or w % 2 ** (levels - 1)):
        levels -= 1
    config: dict[str, Any] = {"in_channels": c, "base_channels": 32 if side <= 12 else 16,
                              "channel_mults": (1, *[2] * (levels - 1)), "num_res_blocks": 1,
                              "attention_levels": (levels - 1,) if side >= 16 else (), "attention_heads": 1,
                              "dropout": 0.0, "time_embed": "sinusoidal"}
    unknown = sorted(set(overrides) - set(inspect.signature(UNet).parameters))
    if unknown:
        raise ValueError(f"unknown UNet arguments: {', '.join(unknown)}")
    config.update(overrides)
    return config


MODELS = {"MLP": MLP, "UNet": UNet}
