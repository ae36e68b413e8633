"""LeFusion's 3D denoiser: the "video" Unet3D of the official code, re-implemented with the same state-dict keys.

Tensors are (B, C, D=slices, H, W). Convolutions are pseudo-3D (1x3x3), so slices mix only through attention:
per-slice linear attention, attention across slices (rotary embedding + T5 relative-position bias) and full
attention over the pixels of each slice at the bottleneck. The time embedding, concatenated with the
histogram condition, enters every ResNet block through FiLM (scale, shift).

Two execution paths share the weights: ``fused=False`` mirrors the official math step by step;
``fused=True`` (default) keeps activations channels-last, runs the attention across slices and at the
bottleneck through ``scaled_dot_product_attention`` (T5 bias as the mask), folds the query scale and the
rotary rotation into the projection weights where that is cheaper, and avoids layout copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model.config import ModelConfig

ROTARY_MAX_DIM = 32
BIAS_BUCKETS = 32
BIAS_MAX_DISTANCE = 32


class Passthrough(nn.Module):
    """Stands in for a disabled block: returns its input unchanged and holds no weights."""

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x


class Residual(nn.Module):
    """x + fn(x)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x + self.fn(x, *args)  # x first: the sum keeps the layout of x


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of (B, C, D, H, W), gain only, biased variance (official ``LayerNorm``).

    The optimised path normalises a channels-last view with ``F.layer_norm``; its result is channels-last.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.fused = True
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(x.movedim(1, -1), x.shape[1:2], self.gamma.view(-1), eps=self.eps).movedim(-1, 1)
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.gamma


class PreNorm(nn.Module):
    """fn(norm(x)) with a channel layer norm."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.fn(self.norm(x), *args)


class SinusoidalEmbedding(nn.Module):
    """[sin | cos] embedding of integer time steps, frequencies exp(-k ln(1e4) / (dim/2 - 1))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative-position bias between slices, one learned scalar per (bucket, head)."""

    def __init__(self, heads: int, num_buckets: int = BIAS_BUCKETS, max_distance: int = BIAS_MAX_DISTANCE) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def buckets(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, n) bucket index of query i and key j: half the buckets per sign, log-spaced beyond half of those."""
        pos = torch.arange(n, device=device)
        dist = pos[:, None] - pos[None, :]
        half = self.num_buckets // 2
        exact = half // 2
        sign_offset = (dist < 0).long() * half
        dist = dist.abs()
        log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return sign_offset + torch.where(dist < exact, dist, far)

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        """Bias (heads, n, n) to add to the attention logits over n slices."""
        return self.relative_attention_bias(self.buckets(n, device)).permute(2, 0, 1).contiguous()


class RotaryEmbedding(nn.Module):
    """Rotary embedding over interleaved feature pairs (rotary-embedding-torch 0.1.5); ``freqs`` is a buffer."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    def angles(self, n: int) -> torch.Tensor:
        """(n, dim) rotation angles of positions 0..n-1, each frequency repeated for its pair."""
        pos = torch.arange(n, device=self.freqs.device, dtype=self.freqs.dtype)
        return (pos[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1)

    def rotate_eager(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate (..., n, d) exactly as the official code does (rotate_half with stack, then concatenate)."""
        angles = self.angles(t.shape[-2]).to(t)
        width = angles.shape[-1]
        head, tail = t[..., :width], t[..., width:]
        pairs = head.unflatten(-1, (-1, 2))
        half_turn = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((head * angles.cos() + half_turn * angles.sin(), tail), dim=-1)

    def tables(self, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, width) cos and signed sin such that rotate(t) = t * cos + swap_pairs(t) * sin.

        Features beyond the rotary width pass through (cos 1, sin 0).
        """
        angles = self.angles(n)
        sign = torch.tensor([-1.0, 1.0], device=angles.device).repeat(angles.shape[-1] // 2)
        pad = (0, width - angles.shape[-1])
        return F.pad(angles.cos(), pad, value=1.0), F.pad(angles.sin() * sign, pad)


def swap_pairs(t: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last axis."""
    return t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary tables from ``RotaryEmbedding.tables`` (broadcast against t) along the last axis."""
    return t * cos.to(t.dtype) + swap_pairs(t) * sin.to(t.dtype)


class Attention(nn.Module):
    """Multi-head softmax attention with optional rotary embedding (official ``Attention``).

    ``forward`` is the plain path on tokens (..., L, C) attending along L. ``attend_fused`` is the optimised
    path on tokens (D, B, P, C) attending along D (slices) or P (pixels): the query scale is folded into the
    weights, and so is the rotary rotation of each slice where the weights are smaller than the activations;
    q, k, v reach ``scaled_dot_product_attention`` as strided views, without layout copies.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: bool) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.rotary_emb = RotaryEmbedding(min(ROTARY_MAX_DIM, dim_head)) if rotary else None
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(-3, -2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        if self.rotary_emb is not None:
            q, k = self.rotary_emb.rotate_eager(q), self.rotary_emb.rotate_eager(k)
        sim = q @ k.transpose(-1, -2)
        if pos_bias is not None:
            sim = sim + pos_bias
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(-3, -2).flatten(-2))

    def attend_fused(self, tokens: torch.Tensor, over_slices: bool, pos_bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
        d, b, p, c = tokens.shape
        h, e = self.heads, self.dim_head
        wq, wk, wv = self.to_qkv.weight.view(3, h, e, c).permute(0, 3, 1, 2)  # each (C, heads, e)
        wq = wq * self.scale
        tables = self.rotary_emb.tables(d, e) if self.rotary_emb is not None else None
        fold = tables is not None and c <= b * p  # rotating the weights of each slice is the cheaper way
        if fold:
            cos, sin = (r[:, None, None] for r in tables)  # (D, 1, 1, e): weights become (D, C, heads, e)
            wq, wk = rotate(wq, cos, sin), rotate(wk, cos, sin)
        rows = tokens.reshape(d, b * p, c)
        q, k, v = ((rows @ w.flatten(-2)).view(d, b, p, h, e) for w in (wq, wk, wv))
        if tables is not None and not fold:
            cos, sin = (r[:, None, None, None] for r in tables)  # (D, 1, 1, 1, e)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if over_slices:  # sequences along D for every (b, p): (B*P, heads, D, e)
            q, k, v = (t.permute(1, 2, 3, 0, 4).flatten(0, 1) for t in (q, k, v))
        else:  # sequences along P for every (d, b): (D*B, heads, P, e)
            q, k, v = (t.permute(0, 1, 3, 2, 4).flatten(0, 1) for t in (q, k, v))
        mask = None if pos_bias is None else pos_bias.to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        if over_slices:
            out = out.unflatten(0, (b, p)).permute(3, 0, 1, 2, 4)
        else:
            out = out.unflatten(0, (d, b)).permute(0, 1, 3, 2, 4)
        return self.to_out(out.reshape(d, b, p, h * e))


class TokenView(nn.Module):
    """Holds an ``Attention`` (at the official ``EinopsToAndFrom`` position) and runs it on (B, C, D, H, W)
    seen as tokens: sequences over slices (``over='slices'``) or over the pixels of each slice."""

    def __init__(self, fn: Attention, over: str) -> None:
        super().__init__()
        if over not in ("slices", "pixels"):
            raise ValueError(f"over must be 'slices' or 'pixels', got {over!r}")
        self.fn = fn
        self.over = over
        self.fused = True

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        if self.fused:
            tokens = x.permute(2, 0, 3, 4, 1).reshape(d, b, h * w, c)
            out = self.fn.attend_fused(tokens, self.over == "slices", pos_bias)
            return out.view(d, b, h, w, c).permute(1, 4, 0, 2, 3)
        if self.over == "slices":
            out = self.fn(x.permute(0, 3, 4, 2, 1).reshape(b, h * w, d, c), pos_bias)
            return out.view(b, h, w, d, c).permute(0, 4, 3, 1, 2)
        out = self.fn(x.permute(0, 2, 3, 4, 1).reshape(b, d, h * w, c), pos_bias)
        return out.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class SpatialLinearAttention(nn.Module):
    """Linear attention over the pixels of each slice: q softmaxed over features, k over positions."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.fused = True
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w)
        if self.fused:
            return self._fused(slices).view(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        return self._eager(slices).view(b, d, c, h, w).transpose(1, 2)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = (t.reshape(n, self.heads, self.dim_head, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(n, -1, h, w))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same math with batched matmuls on (slice*head, e, pixels) blocks, the scale applied to the small
        context; returns pixel-major (slices, H*W, C)."""
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w)
        q, k, v = (torch.bmm(weight.expand(n, -1, -1), tokens).view(n * self.heads, self.dim_head, h * w)
                   for weight in self.to_qkv.weight.view(3, -1, c))
        context = torch.bmm(k.softmax(dim=-1), v.transpose(1, 2)) * self.scale
        out = torch.bmm(context.transpose(1, 2), q.softmax(dim=-2)).view(n, -1, h * w)
        weight = self.to_out.weight.view(c, -1).t().expand(n, -1, -1)
        return torch.baddbmm(self.to_out.bias, out.transpose(1, 2), weight)


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 convolution; the optimised path runs it as a matrix product over the channels of a channels-last
    view (the 3D convolution kernels have no fast 1x1x1 case for that layout)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__(dim, dim_out, 1)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


class ConvBlock(nn.Module):
    """1x3x3 convolution -> GroupNorm -> optional FiLM x (scale + 1) + shift -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = torch.addcmul(shift, x, scale + 1)
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two ConvBlocks with FiLM from the conditioning vector in the first, plus a (1x1x1) residual path."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int | None, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * dim_out)) if emb_dim else None
        self.block1 = ConvBlock(dim, dim_out, groups)
        self.block2 = ConvBlock(dim_out, dim_out, groups)
        self.res_conv = PointwiseConv3d(dim, dim_out) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None:
            scale_shift = self.mlp(emb)[:, :, None, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class Unet3D(nn.Module):
    """The LeFusion denoiser; ``forward(x, t, cond)`` predicts the noise in x (B, C, D, H, W)."""

    def __init__(self, config: ModelConfig, fused: bool = True) -> None:
        super().__init__()
        self.config = config
        c = config
        groups, heads, dim_head = c.resnet_groups, c.attn_heads, c.attn_dim_head

        def over_slices(width: int) -> nn.Module:
            return Residual(PreNorm(width, TokenView(Attention(width, heads, dim_head, rotary=True), "slices")))

        def per_slice(width: int) -> nn.Module:
            return Residual(PreNorm(width, SpatialLinearAttention(width, heads, dim_head)))

        def flagged(flag: bool, make, width: int) -> nn.Module:
            return make(width) if flag else Passthrough()

        self.time_rel_pos_bias = RelativePositionBias(heads)
        pad = c.init_kernel_size // 2
        kernel = (1, c.init_kernel_size, c.init_kernel_size)
        self.init_conv = nn.Conv3d(c.channels, c.dim, kernel, padding=(0, pad, pad))
        self.init_temporal_attn = flagged(c.temporal_attn[0], over_slices, c.dim)
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(c.dim), nn.Linear(c.dim, c.time_dim), nn.GELU(), nn.Linear(c.time_dim, c.time_dim)
        )
        self.null_cond_emb = nn.Parameter(torch.randn(1, c.cond_dim)) if c.cond_dim else None
        emb_dim = c.time_dim + (c.cond_dim or 0)

        dims = [c.dim, *c.level_dims]
        pairs = list(zip(dims[:-1], dims[1:]))
        levels = len(pairs)
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()  # registered before the bottleneck, as in the official key order
        for level, (d_in, d_out) in enumerate(pairs):
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, emb_dim, groups),
                ResnetBlock(d_out, d_out, emb_dim, groups),
                flagged(c.linear_attn[level], per_slice, d_out),
                flagged(c.temporal_attn[level], over_slices, d_out),
                nn.Conv3d(d_out, d_out, (1, 4, 4), (1, 2, 2), (0, 1, 1)) if level < levels - 1 else Passthrough(),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim, groups)
        pixel_attention = TokenView(Attention(mid, heads, dim_head, rotary=False), "pixels")
        self.mid_spatial_attn = Residual(PreNorm(mid, pixel_attention))
        self.mid_temporal_attn = over_slices(mid)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim, groups)
        for level, (d_in, d_out) in reversed(list(enumerate(pairs))):
            self.ups.append(nn.ModuleList([
                ResnetBlock(2 * d_out, d_in, emb_dim, groups),
                ResnetBlock(d_in, d_in, emb_dim, groups),
                flagged(c.linear_attn[level], per_slice, d_in),
                flagged(c.temporal_attn[level], over_slices, d_in),
                nn.ConvTranspose3d(d_in, d_in, (1, 4, 4), (1, 2, 2), (0, 1, 1)) if level > 0 else Passthrough(),
            ]))
        self.final_conv = nn.Sequential(
            ResnetBlock(2 * c.dim, c.dim, None, groups), PointwiseConv3d(c.dim, c.out_channels)
        )
        self.fused = fused

    @property
    def fused(self) -> bool:
        """True: the optimised execution path; False: the plain path mirroring the official code."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        layout = torch.channels_last_3d if self._fused else torch.contiguous_format
        for param in self.parameters():  # 3D convolution weights in the layout of the activations
            if param.dim() == 5:
                param.data = param.data.contiguous(memory_format=layout)
        for module in self.modules():
            if module is not self and hasattr(module, "fused"):
                module.fused = self._fused

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for x (B, C, D, H, W) at integer steps t (B,) under histogram condition cond.

        ``cond`` is (B, cond_dim), or (cond_dim,) / (1, cond_dim) to share one condition across the batch;
        ``None`` uses the learned null condition.
        """
        self._check_input(x, cond)
        if self.fused:  # convolutions and channel norms run faster channels-last
            x = x.contiguous(memory_format=torch.channels_last_3d)
        bias = self.time_rel_pos_bias(x.shape[2], x.device)
        x = self.init_conv(x)
        skip_init = x
        x = self.init_temporal_attn(x, bias)
        emb = self.time_mlp(t)
        if self.null_cond_emb is not None:
            cond = self.null_cond_emb if cond is None else cond
            emb = torch.cat((emb, cond.to(emb).expand(x.shape[0], -1)), dim=-1)
        skips = []
        for block1, block2, spatial_attn, temporal_attn, downsample in self.downs:
            x = block2(block1(x, emb), emb)
            x = temporal_attn(spatial_attn(x), bias)
            skips.append(x)
            x = downsample(x)
        x = self.mid_block1(x, emb)
        x = self.mid_temporal_attn(self.mid_spatial_attn(x), bias)
        x = self.mid_block2(x, emb)
        for block1, block2, spatial_attn, temporal_attn, upsample in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block2(block1(x, emb), emb)
            x = upsample(temporal_attn(spatial_attn(x), bias))
        return self.final_conv(torch.cat((x, skip_init), dim=1)).contiguous()

    def _check_input(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        c = self.config
        factor = 2 ** (len(c.dim_mults) - 1)
        if x.dim() != 5 or x.shape[1] != c.channels:
            raise LeFusionError(f"The denoiser expects input (B, {c.channels}, D, H, W), got {tuple(x.shape)}.")
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise LeFusionError(f"Height and width must be divisible by {factor} for this network, "
                                f"got {tuple(x.shape[-2:])}.")
        if cond is not None and c.cond_dim is None:
            raise LeFusionError("This denoiser takes no condition (its model config has no cond_dim).")
        if cond is not None and cond.shape[-1] != c.cond_dim:
            raise LeFusionError(f"The denoiser expects a condition of {c.cond_dim} values, got {tuple(cond.shape)}.")
