"""CAD's global branch: the Global Context Condensing Block (GCCB) and the global student.

kdjax's reconstruction of Zhang, Suganuma & Okatani, WACV 2024 (docs/METHODS.md,
"CAD"); the paper's code is not public, every choice below is a module field
set from ``config.cad`` (see ``kdjax.methods.cad``).

GCCB (input: the teacher's layer3, or the local student's OCBE output):
  1. channel condensation: 1x1 conv to ``d`` channels + BN + ReLU;
  2. spatial bottleneck: average pooling to a ``pool_grid`` x ``pool_grid``
     grid (0 keeps the input grid), so that, together with the narrow ``d``,
     the global student cannot copy local detail;
  3. global mixing across ALL positions of the grid:
     ``"attention"``: ``attention_blocks`` pre-LayerNorm transformer blocks
     (multi-head self-attention over positions + MLP, residual), with a
     learned position embedding (self-attention alone is blind to where a
     position is, and logical constraints are largely about arrangement);
     ``"pool"``: the global-average context vector is broadcast back to every
     position and fused with it (concat -> 1x1 conv -> ReLU);
     ``"none"``: no mixing (an ablation).
  Output: (N, g, g, d).

Global student: a small convolutional decoder from the GCCB output to the
teacher's scales. Stages at the layer3, layer2, layer1 resolutions (H/16,
H/8, H/4): each upsamples (ConvTranspose 2x2 s2 + BN + ReLU while doubling
fits, bilinear resize for any rest), applies ``blocks`` conv3x3 + BN + ReLU,
and, where that tap is requested, a 1x1 conv head to the teacher's channel
count. Stages below the finest requested tap are not built.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.backends import PORTABLE, Kernels
from kdjax.models.resnet import batch_norm, conv
from kdjax.models import torch_init
from kdjax.models.rd import deconv2x2

Dtype = Any

TAP_ORDER = ("layer3", "layer2", "layer1")  # coarse to fine
MIXINGS = ("attention", "pool", "none")


def avg_pool_to_grid(x: jax.Array, grid: int) -> jax.Array:
    """Average-pool NHWC ``x`` to (grid, grid) with non-overlapping windows
    (torch AdaptiveAvgPool2d when the size divides); ``grid`` <= 0 or >= H: unchanged."""
    n, h, w, c = x.shape
    if grid <= 0 or (grid >= h and grid >= w):
        return x
    if h % grid or w % grid:
        raise ValueError(
            f"cad.pool_grid={grid} does not divide the GCCB input grid {h}x{w}; choose a divisor "
            "(e.g. half of it) or 0 to disable spatial pooling.")
    x = x.reshape(n, grid, h // grid, grid, w // grid, c)
    return jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x.dtype)


class TransformerBlock(nn.Module):
    """Pre-LN block on (N, P, d): x + MHSA(LN(x)); x + MLP(LN(x))."""

    heads: int
    mlp_ratio: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                            param_dtype=jnp.float32, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln2")(x)
        y = nn.Dense(d * self.mlp_ratio, dtype=self.dtype, param_dtype=jnp.float32, name="mlp1")(y)
        y = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name="mlp2")(nn.gelu(y))
        return x + y


class GCCB(nn.Module):
    """Global Context Condensing Block: NHWC features -> (N, g, g, d) global context."""

    d: int = 128
    mixing: str = "attention"
    heads: int = 4
    attention_blocks: int = 1
    mlp_ratio: int = 2
    pos_embed: bool = True
    pool_grid: int = 8
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.mixing not in MIXINGS:
            raise ValueError(f"cad.mixing={self.mixing!r}: use one of {', '.join(MIXINGS)}.")
        x = jnp.asarray(x, self.dtype)
        y = conv(self.d, 1, dtype=self.dtype, name="condense", kernels=self.kernels)(x)
        y = nn.relu(batch_norm(train, self.dtype, "condense_bn")(y))
        y = avg_pool_to_grid(y, int(self.pool_grid))
        n, h, w, d = y.shape
        if self.mixing == "attention":
            if d % self.heads:
                raise ValueError(f"cad.d={d} (after width_divisor) must be a multiple of "
                                 f"cad.heads={self.heads}.")
            tokens = y.reshape(n, h * w, d)
            if self.pos_embed:
                pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w, d),
                                 jnp.float32)
                tokens = tokens + pos.astype(self.dtype)
            for i in range(int(self.attention_blocks)):
                tokens = TransformerBlock(self.heads, self.mlp_ratio, self.dtype,
                                          name=f"block{i}")(tokens)
            tokens = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_out")(tokens)
            y = tokens.reshape(n, h, w, d)
        elif self.mixing == "pool":
            ctx = jnp.mean(y.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(y.dtype)
            y = jnp.concatenate([y, jnp.broadcast_to(ctx, y.shape)], axis=-1)
            y = conv(d, 1, dtype=self.dtype, name="fuse", kernels=self.kernels)(y)
            y = nn.relu(batch_norm(train, self.dtype, "fuse_bn")(y))
        return y


class GlobalStudent(nn.Module):
    """Decoder from the GCCB output to teacher taps.

    ``targets``: tuple of (tap, height, width, channels) for the requested
    taps (any of layer1..3). ``widths``: decoder widths of the layer3, layer2,
    layer1 stages. Returns {tap: (N, height, width, channels)}.
    """

    targets: Tuple[Tuple[str, int, int, int], ...]
    widths: Sequence[int] = (256, 128, 64)
    blocks: int = 2
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, z, train: bool = False):
        want = {t[0]: t[1:] for t in self.targets}
        bad = [k for k in want if k not in TAP_ORDER]
        if bad or not want:
            raise ValueError(f"cad.global_layers must be a non-empty subset of "
                             f"{', '.join(sorted(TAP_ORDER))}; got {list(want)}.")
        finest = max(TAP_ORDER.index(k) for k in want)
        # Stage sizes follow the teacher's pyramid (each tap twice the previous).
        sizes = {}
        for k in TAP_ORDER:
            if k in want:
                sizes[k] = tuple(want[k][:2])
        ref_i, ref = next((i, sizes[k]) for i, k in enumerate(TAP_ORDER) if k in sizes)
        for i, k in enumerate(TAP_ORDER):
            sizes.setdefault(k, (ref[0] * 2 ** (i - ref_i), ref[1] * 2 ** (i - ref_i)))
        x = jnp.asarray(z, self.dtype)
        out = {}
        for i, tap in enumerate(TAP_ORDER[:finest + 1]):
            width = int(self.widths[i])
            th, tw = sizes[tap]
            up = 0
            while x.shape[1] * 2 <= th and x.shape[2] * 2 <= tw:
                x = deconv2x2(width, self.dtype, f"{tap}_up{up}")(x)
                x = nn.relu(batch_norm(train, self.dtype, f"{tap}_up{up}_bn")(x))
                up += 1
            if x.shape[1:3] != (th, tw):
                x = jax.image.resize(x, (x.shape[0], th, tw, x.shape[3]), "bilinear")
            for b in range(int(self.blocks)):
                x = conv(width, 3, dtype=self.dtype, name=f"{tap}_conv{b}",
                         kernels=self.kernels)(x)
                x = nn.relu(batch_norm(train, self.dtype, f"{tap}_bn{b}")(x))
            if tap in want:
                out[tap] = conv(int(want[tap][2]), 1, dtype=self.dtype, name=f"{tap}_head",
                                use_bias=True, kernels=self.kernels)(x)
        return out


class GlobalBranch(nn.Module):
    """GCCB followed by the global student: features -> {tap: NHWC}."""

    targets: Tuple[Tuple[str, int, int, int], ...]
    d: int = 128
    mixing: str = "attention"
    heads: int = 4
    attention_blocks: int = 1
    mlp_ratio: int = 2
    pos_embed: bool = True
    pool_grid: int = 8
    widths: Sequence[int] = (256, 128, 64)
    blocks: int = 2
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x, train: bool = False):
        z = GCCB(self.d, self.mixing, self.heads, self.attention_blocks, self.mlp_ratio,
                 self.pos_embed, self.pool_grid, self.dtype, self.kernels, name="gccb")(x, train)
        return GlobalStudent(self.targets, tuple(self.widths), self.blocks, self.dtype,
                             self.kernels, name="student")(z, train)


def host_init(module: nn.Module, seed: int, *args, **kwargs) -> Dict[str, Any]:
    """Variables of ``module.init(rng, *args, **kwargs)`` drawn with numpy on the host.

    A jitted or eager Flax ``init`` costs an XLA compile (seconds to tens of
    seconds on a CPU); shapes from ``jax.eval_shape`` plus numpy take
    milliseconds. ``args`` may be arrays or ``jax.ShapeDtypeStruct``. Schemes:
    Conv kernels N(0, 2/fan_out) (kaiming fan_out, as the reference RD
    decoder, each conv here being followed by BN + ReLU); ConvTranspose,
    Dense and attention kernels LeCun normal (variance 1/fan_in, Flax's
    default; for the attention output projection fan_in = heads * head_dim);
    biases 0; BatchNorm/LayerNorm scale 1, bias 0, running mean 0, var 1;
    position embeddings N(0, 0.02^2).
    """
    return torch_init.host_init(module, seed, _global_branch_leaf, *args, **kwargs)


def _global_branch_leaf(rng, cls, path, shape, flat):
    """The initialisation scheme of ``host_init`` for one leaf."""
    name = path[-1]
    if name in ("mean", "bias"):
        return np.zeros(shape)
    if name in ("var", "scale"):
        return np.ones(shape)
    if name == "pos_embed":
        return rng.normal(0.0, 0.02, shape)
    if name == "kernel" and cls is not None and issubclass(cls, nn.Conv):
        return rng.normal(0.0, np.sqrt(2.0 / (shape[-1] * int(np.prod(shape[:-2])))), shape)
    if name == "kernel":
        # ConvTranspose (kh, kw, out, in) with transpose_kernel: fan_in = in * kh * kw
        # (Flax's lecun_normal convention); Dense (in, out); attention q/k/v
        # (d, heads, head_dim) and output (heads, head_dim, d).
        if cls is not None and issubclass(cls, nn.ConvTranspose):
            fan_in = int(np.prod(shape[:-2])) * shape[-1]
        elif path[-2] == "out":
            fan_in = int(np.prod(shape[:-1]))
        else:
            fan_in = shape[0]
        return rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
    raise ValueError(f"host_init: no rule for {'/'.join(path)} of {cls}.")


__all__ = ["host_init", "GCCB", "GlobalStudent", "GlobalBranch", "TransformerBlock", "avg_pool_to_grid"]
