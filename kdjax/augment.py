"""Device-side image augmentations of the training step (torchvision's formulas).

EfficientAD's autoencoder branch sees ColorJitter brightness / contrast /
saturation (one of the three, chosen per image) and its penalty images are
RandomGrayscale-d; both are drawn with ``jax.random`` inside the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import ops

# torchvision's rgb_to_grayscale weights (tensor path of ColorJitter / RandomGrayscale).
_GRAY = (0.2989, 0.587, 0.114)


def grayscale(x: jax.Array) -> jax.Array:
    """torchvision ``rgb_to_grayscale`` of NHWC images in [0, 1] -> (N, H, W, 1)."""
    w = jnp.asarray(_GRAY, x.dtype)
    return jnp.sum(x * w, axis=-1, keepdims=True)


def adjust_brightness(x, factor):
    """torchvision adjust_brightness: blend with black, clamp to [0, 1]."""
    f = jnp.reshape(factor, (-1, 1, 1, 1))
    return jnp.clip(f * x, 0.0, 1.0)


def adjust_contrast(x, factor):
    """torchvision adjust_contrast: blend with the mean of the grayscale image, clamp."""
    f = jnp.reshape(factor, (-1, 1, 1, 1))
    mean = jnp.mean(grayscale(x), axis=(1, 2, 3), keepdims=True)
    return jnp.clip(f * x + (1.0 - f) * mean, 0.0, 1.0)


def adjust_saturation(x, factor):
    """torchvision adjust_saturation: blend with the grayscale image, clamp."""
    f = jnp.reshape(factor, (-1, 1, 1, 1))
    return jnp.clip(f * x + (1.0 - f) * grayscale(x), 0.0, 1.0)


def color_jitter_ae(images: jax.Array, rng: jax.Array, strength: float = 0.2) -> jax.Array:
    """The AE branch's augmentation, per image: RandomChoice of ColorJitter
    brightness / contrast / saturation ``strength`` (factor ~ U[1-s, 1+s]).

    ``images`` are ImageNet-normalized NHWC; the jitter is applied to the
    denormalized [0, 1] image with torchvision's tensor formulas and the
    result is normalized again. (The reference jitters the PIL image before
    resizing it to 256; here the resident 256x256 image is jittered, which is
    the same up to the clamp/quantization order.)
    """
    n = images.shape[0]
    k_choice, k_factor = jax.random.split(rng)
    choice = jax.random.randint(k_choice, (n,), 0, 3)
    factor = jax.random.uniform(k_factor, (n,), jnp.float32, max(0.0, 1.0 - strength),
                                1.0 + strength)
    x = jnp.clip(ops.denormalize_images(images.astype(jnp.float32)), 0.0, 1.0)
    gray = grayscale(x)
    # One blend formula, f * x + (1 - f) * other: other = 0 (brightness), the
    # grayscale mean (contrast) or the grayscale image (saturation).
    other = jnp.where(
        (choice == 0)[:, None, None, None], 0.0,
        jnp.where((choice == 1)[:, None, None, None],
                  jnp.mean(gray, axis=(1, 2, 3), keepdims=True), gray))
    f = factor[:, None, None, None]
    out = jnp.clip(f * x + (1.0 - f) * other, 0.0, 1.0)
    mean = jnp.asarray(ops.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(ops.IMAGENET_STD, jnp.float32)
    return ((out - mean) / std).astype(images.dtype)


def penalty_images(images_u8: jax.Array, rng: jax.Array, gray_p: float,
                   dtype=jnp.float32) -> jax.Array:
    """EfficientAD's penalty images (uint8 NHWC, drawn by the engine), each grayscale with
    probability ``gray_p`` (RandomGrayscale), ImageNet-normalized."""
    n = images_u8.shape[0]
    x = images_u8.astype(jnp.float32) / 255.0
    to_gray = jax.random.uniform(rng, (n,)) < gray_p
    x = jnp.where(to_gray[:, None, None, None], jnp.broadcast_to(grayscale(x), x.shape), x)
    mean = jnp.asarray(ops.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(ops.IMAGENET_STD, jnp.float32)
    return ((x - mean) / std).astype(dtype)
