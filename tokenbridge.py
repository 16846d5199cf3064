"""TokenBridge: post-training quantization of continuous VAE latents + dimension-wise AR head.

Reference implementation of "Bridging Continuous and Discrete Tokens for Autoregressive Visual
Generation" (TokenBridge, ICCV 2025, arXiv 2503.16430), in the order of its method section:

  1. GaussianQuantizer     post-training, per-channel quantizer (paper Sec. 3.1, Eq. for γ_k)
  2. frequency_order       frequency-based channel ordering (paper Sec. 3.2, "dimension order")
  3. TokenBridgeConfig     one dataclass, presets tiny / digits / bench-s / base / large / huge
  4. Transformer blocks    plain pre-norm blocks and adaLN blocks with a KV cache
  5. Backbone              MAR-style masked encoder-decoder giving a feature z per position
  6. DimensionwiseARHead   p(q^c | q^<c, z), one `levels`-way classification per channel
  7. TokenBridge           training loss and the sampler (cosine schedule, CFG, confidence order)

Shapes: token-like tensors are channel-last (B, N, C) with N = H*W positions; image-like tensors
are channel-first (B, C, H, W). Usage:

    import tokenbridge as tb
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny"))
    model.calibrate(train_latents)                  # quantizer statistics + channel order
    loss = model(latents, labels)                   # cross-entropy, for training
    latents = model.generate(labels, num_iter=16, cfg=2.0, seed=0)
"""
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6  # every LayerNorm, as in MAR and the official TokenBridge code


def require(condition, message):
    """Bad input gets one clear line, never a deep traceback or silent garbage."""
    if not condition:
        raise ValueError(message)


def patchify(latents):
    """(B, C, H, W) latents -> (B, H*W, C) tokens, one per position."""
    return latents.flatten(2).transpose(1, 2)


def unpatchify(tokens, grid):
    """(B, H*W, C) tokens -> (B, C, H, W) latents, H = W = grid."""
    return tokens.transpose(1, 2).unflatten(2, (grid, grid))


# --- 1. Post-training dimension-wise quantizer ---------------------------------------------------

class GaussianQuantizer(nn.Module):
    """Quantize each channel of a continuous latent into `levels` equiprobable Gaussian bins.

    u = (x - mean_c) / std_c, clamped to [-r, r], falls in the bin b_k <= u < b_{k+1}, with
    b_k = Φ⁻¹(k/levels), clamped; γ_k = E[ξ | b_k <= ξ < b_{k+1}] stands for it, ξ ~ N(0,1).
    Buffers only: it travels with checkpoints and ONNX. assign="nearest" is the official code's
    nearest γ (differs for ~0.5% of values); `order`: the channels' AR order.
    """

    def __init__(self, levels=64, std_range=3.0, channels=16, assign="bins"):
        super().__init__()
        require(levels >= 2,
                f"levels must be >= 2 (got {levels}); the paper uses 64 (16 for the ablation)")
        require(std_range > 0, f"std_range must be > 0 (got {std_range}); the paper uses 3")
        require(assign in ("bins", "nearest"),
                f"assign must be 'bins' or 'nearest' (got {assign!r})")
        self.levels = levels
        self.std_range = std_range
        self.channels = channels
        self.assign = assign

        # float64 for the tables: the tail bins are thin, and float32 Φ⁻¹ loses digits there.
        boundaries = torch.special.ndtri(torch.linspace(0, 1, levels + 1, dtype=torch.float64))
        boundaries = boundaries.clamp(-std_range, std_range)
        a, b = boundaries[:-1], boundaries[1:]
        mass = torch.special.ndtr(b) - torch.special.ndtr(a)
        pdf = torch.exp(-0.5 * boundaries * boundaries) / math.sqrt(2 * math.pi)   # φ(b_k)
        # truncated-normal mean; a bin that the clamp to [-r, r] leaves empty (its mass under
        # N(0, 1) is below Φ(-r): from ~740 levels at r = 3) takes its edge, and is never assigned
        centers = torch.where(mass > 0, (pdf[:-1] - pdf[1:]) / mass, a)
        self.register_buffer("boundaries", boundaries.float())           # (levels+1,)
        self.register_buffer("centers", centers.float())                 # (levels,)
        self.register_buffer("mean", torch.zeros(channels))              # (C,)
        self.register_buffer("std", torch.ones(channels))                # (C,)
        self.register_buffer("order", torch.arange(channels))            # (C,) AR slot -> channel

    def _check_tokens(self, tokens):
        require(tokens.dim() >= 1 and tokens.shape[-1] == self.channels,
                f"expected channel-last tokens (..., {self.channels}), got {tuple(tokens.shape)}; "
                "for (B, C, H, W) latents use tokenbridge.patchify")
        require(tokens.is_floating_point(), f"expected float tokens, got {tokens.dtype}")
        require(bool(torch.isfinite(tokens).all()),
                "tokens contain NaN or inf; check the VAE output")

    @torch.no_grad()
    def calibrate(self, tokens):
        """Set the per-channel mean/std from training latents, tokens (..., C): two passes in
        float64 over chunks, so memory stays one chunk however many latents are calibrated."""
        self._check_tokens(tokens)
        flat = tokens.reshape(-1, self.channels)
        require(flat.shape[0] >= 2, "calibration needs at least 2 token vectors")
        chunks = flat.split(1 << 18)
        mean = sum(chunk.double().sum(0) for chunk in chunks) / len(flat)
        var = sum((chunk.double() - mean).square().sum(0) for chunk in chunks) / (len(flat) - 1)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp_min(1e-8))
        return self

    def with_levels(self, levels):
        """The same calibration (statistics and order) with another number of bins."""
        other = GaussianQuantizer(levels, self.std_range, self.channels, self.assign)
        for name in ("mean", "std", "order"):
            getattr(other, name).copy_(getattr(self, name))
        return other.to(self.mean.device)

    def round_trip(self, latents):
        """Latents (B, C, H, W) through the tokens and back: what the VAE decodes from them."""
        return unpatchify(self.dequantize(self.quantize(patchify(latents))), latents.shape[-1])

    def quantize(self, tokens):
        """(..., C) float -> (..., C) long in [0, levels)."""
        self._check_tokens(tokens)
        u = (tokens.float() - self.mean) / self.std
        u = u.clamp(-self.std_range, self.std_range).contiguous()
        if self.assign == "nearest":
            return (u.unsqueeze(-1) - self.centers).abs().argmin(-1)
        # right=True: a value on a boundary b_k belongs to bin k, as in b_k <= u < b_{k+1}.
        return torch.bucketize(u, self.boundaries[1:-1], right=True)

    def dequantize(self, indices):
        """(..., C) long -> (..., C) float, each index replaced by its bin's conditional mean."""
        require(not indices.is_floating_point() and indices.shape[-1] == self.channels,
                f"expected integer indices (..., {self.channels}), "
                f"got {indices.dtype} {tuple(indices.shape)}")
        require(bool(((indices >= 0) & (indices < self.levels)).all()),
                f"indices must lie in [0, {self.levels})")
        return self.bin_values(indices)

    def bin_values(self, indices):
        """dequantize without its checks, for indices the model drew itself: the range check reads
        a value back from the device, which a GPU sampler would wait for at every step."""
        return self.centers[indices] * self.std + self.mean


# --- 2. Frequency-based dimension ordering -------------------------------------------------------

LOW_FREQUENCY_RADIUS = 0.25  # cycles per latent position: half the Nyquist frequency


def low_frequency_share(latents, radius=LOW_FREQUENCY_RADIUS):
    """Per-channel share of spectral energy at |f| <= radius (cycles per position; 0.5 is the whole
    band), latents (N, C, H, W) -> (C,). Each map's mean is removed first: a constant offset has no
    spatial structure, and counting it would rank channels by their mean instead of their shape."""
    require(latents.dim() == 4 and min(latents.shape[-2:]) >= 2,
            f"expected latents (N, C, H, W) with H, W >= 2, got {tuple(latents.shape)}")
    require(bool(torch.isfinite(latents).all()), "latents contain NaN or inf")
    power = 0.0                                                                 # -> (C, H, W)
    for chunk in latents.split(1024):  # float64 and complex copies of one chunk at a time
        x = chunk.double()
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        power = power + torch.fft.fft2(x).abs().square().sum(0)
    fy = torch.fft.fftfreq(latents.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(latents.shape[-1], dtype=torch.float64)
    low = (fy[:, None].square() + fx[None, :].square()).sqrt() <= radius       # (H, W)
    return (power * low).sum((1, 2)) / power.sum((1, 2)).clamp_min(1e-30)


def frequency_order(latents, radius=LOW_FREQUENCY_RADIUS):
    """Channel generation order, most low-frequency first: structure first, detail later."""
    share = low_frequency_share(latents, radius)
    return torch.argsort(share, descending=True, stable=True)


# --- 3. Configuration ----------------------------------------------------------------------------

@dataclass
class TokenBridgeConfig:
    image_size: int = 32
    vae_stride: int = 4             # image pixels per latent position
    channels: int = 16              # VAE latent channels C = AR head length
    levels: int = 64                # quantization bins per channel (paper: 64; ablation 16)
    std_range: float = 3.0          # r: normalised values are clamped to [-r, r]
    num_classes: int = 10
    buffer_size: int = 4            # leading slots holding the class embedding (MAR: 64)
    encoder_width: int = 64
    encoder_depth: int = 2
    encoder_heads: int = 4
    decoder_width: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    head_width: int = 64
    head_depth: int = 2
    head_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0            # attention and projection dropout (MAR/official: 0.1)
    label_drop_prob: float = 0.1    # classifier-free guidance: train with the null class
    mask_ratio_min: float = 0.7     # MAR: mask ratio ~ truncated N(1, 0.25) on [min, 1]
    head: str = "ar"                # "ar" | "parallel" (ablation: channels independent given z)
    order: str = "frequency"        # "frequency" | "default" (ablation: channels in VAE order)
    official_compat: bool = False   # nearest-centre quantizer + slot-0 sampling quirk, for interop

    def __post_init__(self):
        require(self.levels >= 2, f"levels must be >= 2 (got {self.levels})")
        require(self.image_size % self.vae_stride == 0,
                f"image_size {self.image_size} must be divisible by vae_stride {self.vae_stride}")
        require(self.head in ("ar", "parallel"),
                f"head must be 'ar' or 'parallel' (got {self.head!r})")
        require(self.order in ("frequency", "default"),
                f"order must be 'frequency' or 'default' (got {self.order!r})")
        for part in ("encoder", "decoder", "head"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            require(width % heads == 0,
                    f"{part}_width {width} must be divisible by {part}_heads {heads}")

    @property
    def unconditional(self):
        """Every training label dropped to the null class: a model of p(x) (a one-class folder,
        or train.py --unconditional); it samples with the null class."""
        return self.label_drop_prob >= 1.0

    @property
    def grid(self):
        return self.image_size // self.vae_stride

    @property
    def seq_len(self):
        return self.grid ** 2

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    @classmethod
    def preset(cls, name, **overrides):
        require(name in PRESETS, f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _imagenet(**kw):
    return TokenBridgeConfig(image_size=256, vae_stride=16, num_classes=1000, buffer_size=64,
                             dropout=0.1, **kw)


PRESETS = {
    # tests; also the official tiny reference configuration (32px, VAE stride 4 -> 8x8 tokens)
    "tiny": TokenBridgeConfig(),
    # the CPU demo: the digits through a VAE that compresses, as kl16 does (stride 8 -> 4x4x16), so
    # its latents are near Gaussian, as the bins assume (why not stride 4:
    # docs/findings.md#1-post-training-quantization-is-near-lossless)
    "digits": TokenBridgeConfig(vae_stride=8),
    # 32px images, VAE stride 4 -> 8x8 tokens: the speed benchmark
    "bench-s": TokenBridgeConfig(buffer_size=64,
                                 encoder_width=256, encoder_depth=4, encoder_heads=8,
                                 decoder_width=256, decoder_depth=4, decoder_heads=8,
                                 head_width=256, head_depth=2, head_heads=8),
    # the paper reports L and H; B is MAR-B's backbone with a proportionally smaller head
    "base": _imagenet(encoder_width=768, encoder_depth=12, encoder_heads=12,
                      decoder_width=768, decoder_depth=12, decoder_heads=12,
                      head_width=768, head_depth=4, head_heads=8),
    "large": _imagenet(encoder_width=1024, encoder_depth=16, encoder_heads=16,
                       decoder_width=1024, decoder_depth=16, decoder_heads=16,
                       head_width=1024, head_depth=4, head_heads=8),
    "huge": _imagenet(encoder_width=1280, encoder_depth=20, encoder_heads=16,
                      decoder_width=1280, decoder_depth=20, decoder_heads=16,
                      head_width=1024, head_depth=6, head_heads=8),
}


# --- 4. Transformer blocks -----------------------------------------------------------------------

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim, heads, qk_norm=False, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def _qkv(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)               # (B, L, 3, h, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                     # (B, h, L, hd)
        return self.q_norm(q), self.k_norm(k), v

    def _attend(self, q, k, v, mask):
        B, _, L, _ = q.shape
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, L, -1)))   # (B, L, D)

    def forward(self, x, mask=None):
        """mask: bool, True = may attend; broadcast to (B, h, L, L)."""
        return self._attend(*self._qkv(x), mask)

    def forward_cached(self, x, cache, slot):
        """One new slot x (B, 1, D) at index `slot` (0-d long tensor) of a cache with room for
        every slot, (2, B, h, slots, hd): its key and value are written there, and it attends to
        slots 0..slot. Returns the output and the cache. The shapes never change, whatever the
        slot: a GPU can replay the step as one captured graph."""
        q, k, v = self._qkv(x)
        slots = torch.arange(cache.shape[-2], device=x.device)
        cache = torch.where((slots == slot).unsqueeze(-1), torch.stack([k, v]).to(cache.dtype),
                            cache)
        return self._attend(q, cache[0], cache[1], (slots <= slot).view(1, -1)), cache


class Mlp(nn.Module):
    def __init__(self, dim, ratio, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block of the backbone (timm's ViT block)."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AdaLNBlock(nn.Module):
    """Block of the AR head: qk-normed causal attention, every sub-layer modulated by c (DiT)."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qk_norm=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio, dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, mask=None, cache=None, slot=None):
        """Teacher-forced over all slots (cache None), or one slot with a KV cache."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        if cache is None:
            h = self.attn(h, mask)
        else:
            h, cache = self.attn.forward_cached(h, cache, slot)
        x = x + gate1 * h
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, cache


class FinalLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


# --- 5. Backbone: MAR's masked encoder-decoder over spatial positions ----------------------------

def _along(index, x):
    """index (B, K) of rows of x (B, *, D), expanded over D for gather and scatter."""
    return index.unsqueeze(-1).expand(-1, -1, x.shape[-1])


class Backbone(nn.Module):
    """Known positions (dequantized tokens) + class -> a feature z for every position. As in MAR,
    the encoder sees only the class buffer and the known positions, the decoder every position
    (unknown ones as the mask token). Every image of a batch has as many unknown positions, so the
    known ones gather into a (B, V, D) batch, in training, sampling and ONNX alike.
    Shapes: S = buffer_size class slots, V the kept slots, De / Dd the encoder / decoder width."""

    def __init__(self, config):
        super().__init__()
        self.num_classes = config.num_classes
        self.buffer_size = config.buffer_size
        self.grad_checkpointing = False
        slots = config.buffer_size + config.seq_len          # the class buffer, then the positions

        # encoder: the class buffer and the known positions
        self.class_emb = nn.Embedding(config.num_classes, config.encoder_width)
        self.fake_latent = nn.Parameter(torch.zeros(1, config.encoder_width))  # the null class
        self.z_proj = nn.Linear(config.channels, config.encoder_width)
        self.z_proj_ln = nn.LayerNorm(config.encoder_width, eps=LN_EPS)
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, slots, config.encoder_width))
        self.encoder_blocks = nn.ModuleList(
            Block(config.encoder_width, config.encoder_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(config.encoder_width, eps=LN_EPS)

        # decoder: every position, the unknown ones as the mask token
        self.decoder_embed = nn.Linear(config.encoder_width, config.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, slots, config.decoder_width))
        self.decoder_blocks = nn.ModuleList(
            Block(config.decoder_width, config.decoder_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(config.decoder_width, eps=LN_EPS)
        self.output_pos_embed = nn.Parameter(torch.zeros(1, config.seq_len, config.decoder_width))

    def class_embedding(self, labels):
        """labels in [0, num_classes]; the extra label num_classes is the null class."""
        known = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where((labels == self.num_classes).unsqueeze(-1), self.fake_latent, known)

    def _run(self, blocks, x):
        recompute = self.grad_checkpointing and self.training  # again in backward: less memory
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x

    @staticmethod
    def count_masked(mask):
        """The number of unknown positions, the same in every image, read back from the device
        (one wait for a GPU); in an ONNX trace, a tensor the graph computes."""
        if torch.jit.is_tracing():
            return mask[0].sum()
        counts = mask.sum(1).tolist()
        require(min(counts) == max(counts),
                f"every image needs the same number of masked positions (got {counts}); "
                "draw masks as TokenBridge.random_mask does")
        return counts[0]

    def forward(self, values, mask, labels, masked=None):
        """values (B, N, C) dequantized tokens, mask (B, N) bool True = unknown, labels (B,).
        masked: the number of unknown positions of every image when the caller knows it (the
        sampler), so that nothing is read back from the device; None: counted from mask."""
        B, L = values.shape[0], self.buffer_size + mask.shape[1]
        masked = self.count_masked(mask) if masked is None else masked

        # the class buffer, then the projected values
        buffer = self.class_embedding(labels).unsqueeze(1).expand(-1, self.buffer_size, -1)
        x = torch.cat([buffer, self.z_proj(values)], dim=1)                     # (B, S+N, De)
        x = self.z_proj_ln(x + self.encoder_pos_embed)

        # dropping: the encoder sees the buffer and the known positions only, in slot order
        # (a sort moves the unknown ones last: the count is known, so nothing is read back)
        slots = torch.arange(L, device=mask.device).expand(B, L)
        unknown = F.pad(mask, (self.buffer_size, 0), value=False)               # (B, S+N)
        keep = slots.masked_fill(unknown, L).sort(dim=1).values[:, :L - masked]  # (B, V)
        x = self._run(self.encoder_blocks, x.gather(1, _along(keep, x)))        # (B, V, De)

        # the decoder: encoded slots back in place, the mask token everywhere else
        x = self.decoder_embed(self.encoder_norm(x))                            # (B, V, Dd)
        x = self.mask_token.to(x.dtype).repeat(B, L, 1).scatter(1, _along(keep, x), x)
        x = self._run(self.decoder_blocks, x + self.decoder_pos_embed)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.output_pos_embed                                        # (B, N, Dd)


# --- 6. Dimension-wise AR head: p(q) = Π_c p(q^c | q^<c, z) at every position --------------------

class DimensionwiseARHead(nn.Module):
    """A small causal transformer over C slots per position, in generation order. Slot 0 holds
    proj(z), slot c > 0 the embedding of token q^{c-1} (a table per slot); slot c predicts channel
    c with its own `levels`-way classifier; every block is adaLN-conditioned on proj(z) + a slot
    embedding. parallel=True is the ablation: no tokens in, each channel from z alone.
    Shapes: M positions, C slots (one per channel), D = head_width, K = levels."""

    def __init__(self, config):
        super().__init__()
        self.channels = config.channels
        self.levels = config.levels
        self.parallel = config.head == "parallel"
        self.grad_checkpointing = False
        self.slot0_quirk = config.official_compat
        self.heads = config.head_heads
        self.head_dim = config.head_width // config.head_heads

        # the slots: slot_pos is added to each slot's input, slot_cond to its adaLN condition
        self.condition_proj = nn.Linear(config.decoder_width, config.head_width)
        self.slot_pos = nn.Parameter(torch.zeros(config.channels, config.head_width))   # (C, D)
        self.slot_cond = nn.Parameter(torch.zeros(config.channels, config.head_width))  # (C, D)
        if not self.parallel:  # slot c+1 embeds token c, with table c
            self.token_embed = nn.Parameter(
                torch.zeros(config.channels - 1, config.levels, config.head_width))  # (C-1, K, D)

        # the causal transformer over the slots, then one classifier per channel
        self.blocks = nn.ModuleList(
            AdaLNBlock(config.head_width, config.head_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.head_depth))
        self.norm = nn.LayerNorm(config.head_width, eps=LN_EPS)
        self.final = FinalLayer(config.head_width)
        self.out_weight = nn.Parameter(
            torch.zeros(config.channels, config.levels, config.head_width))        # (C, K, D)
        self.out_bias = nn.Parameter(torch.zeros(config.channels, config.levels))    # (C, K)
        causal = torch.ones(config.channels, config.channels, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def project(self, z):
        """Backbone features (..., Dd) -> the head's condition (..., D), once per position."""
        return self.condition_proj(z)

    def _embed(self, tokens, tables):
        """Token t of table c (broadcast); F.embedding's backward adds repeats in a fixed order."""
        return F.embedding(tokens + self.levels * tables, self.token_embed.flatten(0, 1))

    def _logits(self, x, c, slots):
        x = self.final(self.norm(x), c)
        return torch.einsum("...sd,skd->...sk", x, self.out_weight[slots]) + self.out_bias[slots]

    def forward(self, cond, tokens):
        """Teacher forcing. cond (M, D), tokens (M, L) in generation order, L < C.

        Returns logits (M, L+1, levels) for channels 0..L; L = C-1 gives the full training pass."""
        M, L = tokens.shape

        # slot 0 holds cond, slot c > 0 token c-1 (zeros in the parallel ablation)
        if self.parallel:
            inputs = cond.new_zeros(M, L, cond.shape[-1])
        else:
            inputs = self._embed(tokens, torch.arange(L, device=cond.device))      # (M, L, D)
        x = torch.cat([cond.unsqueeze(1), inputs], dim=1) + self.slot_pos[:L + 1]  # (M, L+1, D)
        c = cond.unsqueeze(1) + self.slot_cond[:L + 1]                             # (M, L+1, D)

        # causal attention over the slots, then each slot's classifier
        recompute = self.grad_checkpointing and self.training  # again in backward: less memory
        for block in self.blocks:
            args = (x, c, self.causal[:L + 1, :L + 1])
            x, _ = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return self._logits(x, c, slice(0, L + 1))

    def empty_cache(self, rows, device=None, dtype=torch.float32):
        """The KV cache before channel 0, with room for every slot:
        (depth, 2, rows, heads, C slots, head_dim)."""
        return torch.zeros(len(self.blocks), 2, rows, self.heads, self.channels, self.head_dim,
                           device=device, dtype=dtype)

    def step(self, cond, prev_token, t, cache):
        """One channel: cond (M, D), prev_token (M,) = q^{t-1} (ignored at t=0), t a 0-d long
        tensor, cache holding slots 0..t-1. Returns logits (M, levels) for channel t, equal to
        forward()'s slot t to float tolerance, and the cache with slot t written."""
        # slot t's input, as in forward()
        if self.parallel:
            token = torch.zeros_like(cond)
        else:  # slot t embeds token t-1 with table t-1 (clamped: slot 0 uses cond instead)
            token = self._embed(prev_token, (t - 1).clamp(min=0))                  # (M, D)
        # official_compat: the official sampler adds slot_cond[0] to slot 0, unlike its training
        first = cond + self.slot_cond[0] if self.slot0_quirk else cond
        # slot t's embeddings gathered on the device: indexing by the 0-d tensor t would read
        # it back to the host, a wait for a GPU at every channel
        slot = t.view(1)
        x = torch.where(t == 0, first, token) + self.slot_pos.index_select(0, slot)
        c = cond + self.slot_cond.index_select(0, slot)
        x, c = x.unsqueeze(1), c.unsqueeze(1)                                      # (M, 1, D)

        # every block attends to its cached slots and grows its cache by one
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block(x, c, cache=layer_cache, slot=t)
            new_cache.append(layer_cache)
        return self._logits(x, c, t.view(1))[:, 0], torch.stack(new_cache)


# --- 7. TokenBridge: training loss and sampler ---------------------------------------------------

def mask_schedule(seq_len, num_iter):
    """Positions still masked after each step: floor(N cos(π/2 (s+1)/T)), at least 1 and one fewer
    than before, 0 after the last (MAR). Pure Python: the ONNX loop copies it digit for digit."""
    left, remaining = [], seq_len
    for s in range(num_iter):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / num_iter))
        remaining = 0 if s == num_iter - 1 else max(1, min(remaining - 1, n))
        left.append(remaining)
    return left


def guidance_weight(cfg, seq_len, left, schedule="linear", official_clamp=False):
    """Guidance weight of a decoding step that leaves `left` positions masked: "linear" grows from
    1 to cfg with the share of positions decoded (MAR), "constant" is cfg. The official code
    counts at least one position as left, so its last step stops at 1 + (cfg - 1)(N - 1)/N."""
    if schedule == "constant":
        return cfg
    return 1.0 + (cfg - 1.0) * (seq_len - max(left, int(official_clamp))) / seq_len


def sample_from_logits(logits, uniforms, temperature):
    """Pick a token per row by inverse CDF with supplied uniforms (M,), so both runtimes agree:
    tokens (M,) and their log-probabilities. temperature 0 is greedy; a tensor in ONNX."""
    if not isinstance(temperature, torch.Tensor):  # filled on the device: an upload would wait
        temperature = torch.full((), temperature, device=logits.device)
    greedy = temperature == 0
    logp = torch.log_softmax(logits.float() / torch.where(greedy, 1.0, temperature), dim=-1)
    cdf = logp.exp().cumsum(-1)
    token = (cdf < uniforms.unsqueeze(-1)).sum(-1).clamp(max=logits.shape[-1] - 1)
    token_logp = logp.gather(-1, token.unsqueeze(-1))[:, 0]
    return torch.where(greedy, logits.argmax(-1), token), torch.where(greedy, 0.0, token_logp)


class TokenBridge(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.quantizer = GaussianQuantizer(config.levels, config.std_range, config.channels,
                                           assign="nearest" if config.official_compat else "bins")
        self.backbone = Backbone(config)
        self.head = DimensionwiseARHead(config)
        self._init_weights()

    def _init_weights(self):
        # As MAR / the official code: xavier for linears, N(0, 0.02) for learned embeddings ...
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        b, h = self.backbone, self.head
        for p in (b.class_emb.weight, b.fake_latent, b.mask_token, b.encoder_pos_embed,
                  b.decoder_pos_embed, b.output_pos_embed, h.slot_pos, h.slot_cond):
            nn.init.normal_(p, std=0.02)
        # ... token tables keep nn.Embedding's N(0, 1), classifiers are xavier like nn.Linear ...
        if not h.parallel:
            nn.init.normal_(h.token_embed)
        bound = math.sqrt(6 / (h.out_weight.shape[1] + h.out_weight.shape[2]))
        nn.init.uniform_(h.out_weight, -bound, bound)
        # ... and zero-init adaLN so each head block starts as the identity (DiT).
        for m in list(h.blocks) + [h.final]:
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def set_grad_checkpointing(self, enabled=True):
        """Recompute every transformer block's activations in backward, the backbone's and the
        head's: the memory of training falls to about the blocks' inputs, for ~1/3 more compute."""
        self.backbone.grad_checkpointing = self.head.grad_checkpointing = enabled
        return self

    def capture_sampler(self):
        """Capture the head's channel step, the sampler's hot path, with torch.compile: traced once
        into a graph of the same operators, which a GPU records as a CUDA graph and replays as one
        launch instead of a few hundred (backend "cudagraphs"); elsewhere the graph runs operator
        by operator ("aot_eager"). The same kernels either way, so the same tokens. Every channel
        step has the same shapes, so it is traced once per number of rows. Call after .to(device).
        """
        backend = "cudagraphs" if next(self.parameters()).is_cuda else "aot_eager"
        self.head.step = torch.compile(self.head.step, backend=backend, fullgraph=True)
        return self

    # --- input checks ----------------------------------------------------------------------------
    def _check_latents(self, latents):
        channels, grid = self.config.channels, self.config.grid
        require(latents.dim() == 4 and tuple(latents.shape[1:]) == (channels, grid, grid),
                f"expected latents (B, {channels}, {grid}, {grid}) for image_size "
                f"{self.config.image_size} / vae_stride {self.config.vae_stride}, "
                f"got {tuple(latents.shape)}; check the VAE and the config")
        require(bool(torch.isfinite(latents).all()),
                "latents contain NaN or inf; check the VAE output")

    def _check_labels(self, labels, batch=None, allow_null=False):
        """allow_null: in sampling, label num_classes is the null class (unconditional). In
        sampling, deploy.check_labels is the twin (the same checks, in order, and messages)."""
        num_classes = self.config.num_classes
        integers = labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        require(labels.dim() == 1 and len(labels) > 0 and integers,
                "labels must be a 1-D array of integer class numbers, got "
                f"{'integers' if integers else 'non-integers'} of shape {tuple(labels.shape)}")
        require(batch is None or labels.shape[0] == batch,
                f"got {labels.shape[0]} labels for a batch of {batch} latents")
        top = num_classes + 1 if allow_null else num_classes
        null = f" ({num_classes}: unconditional)" if allow_null else ""
        if not bool(((labels >= 0) & (labels < top)).all()):  # the labels read back on failure only
            raise ValueError(f"labels must lie in [0, {top}) for this model's {num_classes} "
                             f"classes{null}, got {labels.tolist()[:8]}")

    def _check_sampling(self, num_iter, cfg, temperature, cfg_mode, cfg_schedule, position_order,
                        confidence_noise):
        """In the order of sample_tokens' arguments; OnnxSampler._check_sampling is the twin."""
        N = self.config.seq_len
        require(isinstance(num_iter, (int, np.integer)) and 1 <= num_iter <= N,
                f"num_iter must be in [1, {N}] (one position at least per step), got {num_iter!r}")
        require(cfg >= 0, f"cfg must be >= 0 (1 = no guidance), got {cfg}")
        require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
        for name, value, choices in (("cfg_mode", cfg_mode, ("features", "logits")),
                                     ("cfg_schedule", cfg_schedule, ("linear", "constant")),
                                     ("position_order", position_order, ("random", "confidence"))):
            require(value in choices, f"{name} must be one of {choices}, got {value!r}")
        require(confidence_noise >= 0, f"confidence_noise must be >= 0, got {confidence_noise}")

    @torch.no_grad()
    def calibrate(self, latents):
        """Fit the quantizer's per-channel statistics and channel order to latents (N, C, H, W)."""
        self._check_latents(latents)
        self.quantizer.calibrate(patchify(latents))
        frequency = self.config.order == "frequency"
        order = frequency_order(latents) if frequency else torch.arange(self.config.channels)
        self.quantizer.order.copy_(order)
        return self

    # --- training ------------------------------------------------------------------------------
    def random_mask(self, batch, device, generator=None):
        """MAR masking: one ratio per batch ~ truncated N(1, 0.25) on [mask_ratio_min, 1], a random
        order per image. Returns mask (B, N) on `device`, True = masked (to predict). generator:
        a CPU torch.Generator that both draws come from, on the CPU, so that no global random
        state moves (evaluation); None: torch's global generators, the order on `device`."""
        N = self.config.seq_len
        lo = (self.config.mask_ratio_min - 1.0) / 0.25             # the lower bound, standardised
        ndtr_lo = torch.special.ndtr(torch.tensor(lo, dtype=torch.float64))
        u = torch.rand((), dtype=torch.float64, generator=generator)
        u = ndtr_lo + (0.5 - ndtr_lo) * u                                     # inverse-CDF draw
        ratio = 1.0 + 0.25 * torch.special.ndtri(u).item()
        num_masked = min(N, math.ceil(N * ratio))
        where = device if generator is None else "cpu"          # a CPU generator draws there
        rank = torch.rand(batch, N, device=where, generator=generator).argsort(-1).argsort(-1)
        return (rank < num_masked).to(device)                                  # random order

    def token_logits(self, latents, labels, mask, head_positions=0):
        """Backbone + teacher-forced head: logits (M, C, levels) and targets (M, C) for the M masked
        positions, channels in generation order. head_positions > 0 runs the head on that many
        random masked positions per image: an unbiased estimate of the same loss, for when the
        head (C slots per position) dominates a step. 0 = every masked position (the paper)."""
        tokens = patchify(latents)                                                 # (B, N, C)
        indices = self.quantizer.quantize(tokens)                                  # (B, N, C)
        z = self.backbone(self.quantizer.dequantize(indices), mask, labels)        # (B, N, Dd)

        # head_positions > 0: keep that many of each image's masked positions, at random
        if 0 < head_positions < self.config.seq_len:
            score = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
            picked = score.topk(head_positions, dim=-1).indices
            mask = mask & torch.zeros_like(mask).scatter_(1, picked, True)

        # the head, teacher-forced on each position's channels in generation order
        targets = indices[mask][:, self.quantizer.order]                           # (M, C)
        return self.head(self.head.project(z[mask]), targets[:, :-1]), targets

    def forward(self, latents, labels, head_positions=0):
        """Training loss: cross-entropy averaged over every (masked position, channel) pair, as
        the official code's F.cross_entropy; in nats (divide by ln 2 for bits/token)."""
        self._check_latents(latents)
        self._check_labels(labels, latents.shape[0])

        # the mask; in training, labels dropped to the null class for classifier-free guidance
        mask = self.random_mask(latents.shape[0], latents.device)
        if self.training:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.label_drop_prob
            labels = torch.where(drop, self.config.num_classes, labels)

        # cross-entropy of the head's logits
        logits, targets = self.token_logits(latents, labels, mask, head_positions)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    # --- sampling ------------------------------------------------------------------------------
    def condition(self, values, mask, labels, masked=None):
        """Backbone + the head's input projection: (B, N, C) known values -> (B, N, D)."""
        return self.head.project(self.backbone(values, mask, labels, masked))

    def condition_rows(self, values, mask, labels, candidates, guidance, masked=None):
        """The head's condition at each image's candidate positions (B, k): condition(), and its
        rows gathered, (G, M, D) with M = B*k rows, for G = 1 or the 2 guidance halves (images
        with their class, then with the null class); and feature guidance's mix of the halves,
        (1, M, D). Guidance on backbone features z is applied after the head's linear projection:
        proj(z_u + w (z_c - z_u)) = proj(z_u) + w (proj(z_c) - proj(z_u)), exactly; and on the
        gathered rows alone, which changes no value. Both outputs: one graph serves both modes."""
        cond = self.condition(values, mask, labels, masked)                      # (G*B, N, D)
        halves = cond.shape[0] // candidates.shape[0]
        index = candidates.repeat(halves, 1)                                       # (G*B, k)
        rows = cond.gather(1, _along(index, cond)).reshape(halves, -1, cond.shape[-1])
        return rows, rows[-1:] + guidance * (rows[:1] - rows[-1:])

    def _sample_channels(self, cond, uniforms, temperature, logit_guidance=None):
        """Channel by channel with the KV cache. cond (M, D), or (2M, D) with logit guidance w
        (cond rows first); uniforms (M, C). Returns tokens (M, C) in VAE channel order and the
        summed log-probability of each position's C tokens. Nothing is read back from the device
        and every step has the same shapes."""
        device = cond.device
        # under autocast the keys and values are computed in 16 bits: the cache keeps them so
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else cond.dtype
        cache = self.head.empty_cache(len(cond), device, dtype)
        token = torch.zeros(len(cond), dtype=torch.long, device=device)
        steps = torch.arange(self.config.channels, device=device)  # made there, not uploaded
        generated, score = [], 0.0
        for t in range(self.config.channels):
            logits, cache = self.head.step(cond, token, steps[t], cache)
            if logit_guidance is not None:
                l_cond, l_uncond = logits.chunk(2)
                logits = l_uncond + logit_guidance * (l_cond - l_uncond)
            token, logp = sample_from_logits(logits, uniforms[:, t], temperature)
            generated.append(token)
            score = score + logp
            if logit_guidance is not None:
                token = token.repeat(2)
        tokens = torch.empty_like(uniforms, dtype=torch.long)
        tokens[:, self.quantizer.order] = torch.stack(generated, dim=1)            # (M, C)
        return tokens, score

    @torch.no_grad()
    def sample_tokens(self, labels, num_iter=None, cfg=1.0, temperature=1.0, seed=0,
                      cfg_mode="features", cfg_schedule="linear", position_order="random",
                      confidence_noise=1.0, on_step=None):
        """MAR-style iterative decoding of all positions: token indices (B, N, C). labels (B,):
        classes, or num_classes for unconditional samples (guidance leaves the null class
        unchanged). num_iter: decoding steps, by default one position each (the paper's 256 on
        ImageNet). Every random number comes from numpy.random.default_rng(seed), in this
        sequence: random order: one permutation of N per image; then per step: uniforms (B, N, C)
        for the channel tokens, and in confidence order also uniforms (B, N) for the Gumbel noise.
        on_step(s, tokens, mask), if given, gets copies after each step s (mask: still unknown)."""
        device = next(self.parameters()).device

        def upload(array):  # from pinned memory: a copy from pageable memory waits for the GPU
            tensor = torch.as_tensor(array)
            if device.type == "cuda" and not tensor.is_cuda:
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)

        labels = torch.as_tensor(labels)
        self._check_labels(labels, allow_null=True)     # on the host, unless given on the device
        labels = upload(labels)
        B, N, C = len(labels), self.config.seq_len, self.config.channels
        num_iter = N if num_iter is None else num_iter
        self._check_sampling(num_iter, cfg, temperature, cfg_mode, cfg_schedule, position_order,
                             confidence_noise)

        # random order: the permutations are the generator's first draws
        rng = np.random.default_rng(seed)
        if position_order == "random":
            orders = upload(np.stack([rng.permutation(N) for _ in range(B)]))  # (B, N)

        # guidance runs every image twice: its class first, then the null class
        guided = cfg != 1.0
        reps = 2 if guided else 1
        null_labels = torch.full_like(labels, self.config.num_classes)
        all_labels = torch.cat([labels, null_labels]) if guided else labels
        tokens = torch.zeros(B, N, C, dtype=torch.long, device=device)
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
        masked = N  # positions still unknown in every image: counted here, never read back
        for s, left in enumerate(mask_schedule(N, num_iter)):
            # this step's uniforms; the candidate positions of each image, in position order:
            # random order decodes the next slice of each permutation, confidence order samples
            # every unknown position
            uniforms = upload(rng.random((B, N, C)).astype(np.float32))
            if position_order == "random":
                candidates = orders[:, left:masked].sort(dim=1).values            # (B, k)
            else:
                positions = torch.arange(N, device=device).expand(B, N)
                candidates = positions.masked_fill(~mask, N).sort(dim=1).values[:, :masked]

            # the candidates conditioned on the tokens known so far, guided
            values = self.quantizer.bin_values(tokens).repeat(reps, 1, 1)
            w = guidance_weight(cfg, N, left, cfg_schedule, self.config.official_compat)
            rows, mixed = self.condition_rows(values, mask.repeat(reps, 1), all_labels,
                                              candidates, w, masked)             # (G, M, D)
            cond = mixed if guided and cfg_mode == "features" else rows

            # the channels of every candidate
            logit_guidance = w if guided and cfg_mode == "logits" else None
            new, score = self._sample_channels(cond.flatten(0, 1),
                                               uniforms.gather(1, _along(candidates, uniforms))
                                               .flatten(0, 1), temperature, logit_guidance)
            new, score = new.view(B, -1, C), score.view(B, -1)                   # (B, k, C)

            # confidence order: keep the most likely positions, Gumbel noise fading out
            chosen = candidates
            if position_order == "confidence":
                noise = upload(rng.random((B, N)).astype(np.float32))
                gumbel = -torch.log(-torch.log(noise))
                scores = torch.full((B, N), -math.inf, device=device).scatter(1, candidates, score)
                scores = scores + confidence_noise * (1 - (s + 1) / num_iter) * gumbel
                chosen = scores.topk(masked - left, dim=-1).indices
                # the kept candidates' tokens: index j of candidates holds position candidates[j]
                slot_of = torch.zeros(B, N, dtype=torch.long, device=device).scatter(
                    1, candidates, torch.arange(masked, device=device).expand(B, -1))
                new = new.gather(1, _along(slot_of.gather(1, chosen), new))

            # the chosen positions become known
            tokens = tokens.scatter(1, _along(chosen, tokens), new)
            mask = mask.scatter(1, chosen, False)
            masked = left
            if on_step is not None:  # copies: a watcher cannot change the sampling
                on_step(s, tokens.clone(), mask.clone())
        return tokens

    @torch.no_grad()
    def generate(self, labels, num_iter=None, cfg=1.0, temperature=1.0, seed=0, **kwargs):
        """Sample images' latents (B, C, H, W), dequantized, ready for the VAE decoder."""
        tokens = self.sample_tokens(labels, num_iter, cfg, temperature, seed, **kwargs)
        return unpatchify(self.quantizer.dequantize(tokens), self.config.grid)
