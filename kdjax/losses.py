"""Loss functions shared by the methods (pure functions of arrays)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps


def cosine_distance_map(t: jax.Array, s: jax.Array) -> jax.Array:
    """Per-pixel 1 - cos(T[n,h,w,:], S[n,h,w,:]) of NHWC maps -> (N, H, W)."""
    t = t.astype(jnp.float32)
    s = s.astype(jnp.float32)
    dot = jnp.sum(t * s, axis=-1)
    nt = jnp.sqrt(jnp.sum(t * t, axis=-1))
    ns = jnp.sqrt(jnp.sum(s * s, axis=-1))
    return 1.0 - dot / jnp.maximum(nt * ns, _EPS)


def flat_cosine_loss(teacher: Sequence[jax.Array], student: Sequence[jax.Array]) -> jax.Array:
    """RD4AD's training loss: per sample 1 - cos(vec T, vec S) over the whole
    HxWxC map, averaged over the batch, summed over the scales."""
    total = 0.0
    for t, s in zip(teacher, student):
        t = t.reshape(t.shape[0], -1).astype(jnp.float32)
        s = s.reshape(s.shape[0], -1).astype(jnp.float32)
        dot = jnp.sum(t * s, axis=-1)
        norm = jnp.sqrt(jnp.sum(t * t, -1)) * jnp.sqrt(jnp.sum(s * s, -1))
        total = total + jnp.mean(1.0 - dot / jnp.maximum(norm, _EPS))
    return total


def hard_feature_loss(distance: jax.Array, quantile: float = 0.999) -> jax.Array:
    """EfficientAD's hard loss: mean of the distances >= their ``quantile``.

    torch.quantile uses linear interpolation, as jnp.quantile does by default.
    """
    d = distance.reshape(-1).astype(jnp.float32)
    q = jnp.quantile(d, quantile)
    keep = d >= q
    return jnp.sum(jnp.where(keep, d, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
