"""EfficientAD (Batzner et al., WACV 2024) and the DFSC margin constraint (Lee & Kim 2024).

Recipe: docs/METHODS.md, sections "EfficientAD" and "DFSC margin".
The reference is the reproduction nelson1425/EfficientAD (``efficientad.py``),
which this file follows step by step:

* teacher: a frozen PDN (384 channels) whose outputs are normalized with the
  channel mean/std of the training set (:meth:`EfficientAD.prepare`);
* student: a PDN with 768 channels; its first 384 imitate the teacher (local
  branch), its last 384 imitate the autoencoder (global branch);
* autoencoder: sees the image after one of ColorJitter brightness / contrast /
  saturation 0.2, chosen at random (done here on the device, see
  :func:`color_jitter_ae`);
* loss = hard loss (mean of the student-teacher squared distances at or above
  their 0.999 quantile) [+ penalty on a natural image] + AE loss + student-AE
  loss [+ w * DFSC margin];
* maps: local = channel mean (T - S[:384])^2, global = channel mean
  (A - S[384:])^2 at the PDN's resolution (56x56 at 256 px); the engine
  normalizes each with the 0.9 / 0.995 quantiles of the validation maps at
  that resolution and combines them 0.5 / 0.5 (the reference's
  ``0.5 * map_st + 0.5 * map_ae`` of normalized maps); ``finish_maps`` then
  zero-pads the combined map by 4 pixels and upsamples it bilinearly to the
  input size, as the reference's test loop does.

DFSC margin (Lee & Kim 2024; no code is public, docs/METHODS.md "DFSC
margin"). At each step the positions where the autoencoder fails to
reproduce the teacher, channel-mean ``d_ta = ||T - A||^2`` (augmented image)
strictly above its ``margin_quantile`` over the batch, are "distinctive"; on
them a hinge is added with weight ``margin_weight``. Squared distances are
channel MEANS (as the anomaly maps are). ``margin_target`` says which
distance the hinge keeps from falling below the gap:

* "autoencoder" (the published description: a gap kept between the teacher
  and the autoencoder's representation of the distinctive features):
  ``mean(relu(gap - ||T - A||^2))``; its gradient reaches only the
  autoencoder A (the teacher is stop-gradient; the selection and the gap are
  constants), keeping A from closing in on the teacher where it is already
  distinctive, so the global map keeps its contrast there.
* "student" (kdjax's earlier reconstruction):
  ``mean(relu(gap - ||S_ae - T||^2))``; its gradient reaches only the
  student's global branch S_ae, which must not collapse onto the teacher where
  the autoencoder cannot reproduce it.

``margin_mode`` sets the gap: "absolute", ``gap = margin`` (the distance
scale of the normalized teacher features, whose channel-mean square is 1);
"relative", ``gap = margin * d_ta`` at that position (scale free). With the
"autoencoder" target the relative gap compares ``d_ta`` with a multiple of
itself, ``relu((margin - 1) * d_ta)``: never active for margin <= 1 and never
satisfied for margin > 1 (a plain push of A away from T), so use the
absolute gap there (configs/loco_margin.py does). With the "student" target
an absolute margin of 0.5 was measured never to fire on the synthetic set
(the branch already sits farther than that), hence the relative gap the
earlier configs used. The logged ``margin_active`` is the fraction of
distinctive positions whose hinge is active. With ``margin_weight == 0`` the
term is not even traced: training is EfficientAD exactly, whatever the
target.

Method-specific settings live in ``config.efficientad`` (see
:func:`default_efficientad_config` for every key and its meaning).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import ops, xla
from kdjax.methods.base import Method
from kdjax.models.pdn import CONV_IMPLS, PDN, Autoencoder, pdn_output_size

log = logging.getLogger("kdjax")

_ARCH_OF_SIZE = {"S": "pdn_small", "M": "pdn_medium"}
_SIZE_ALIASES = {"s": "S", "small": "S", "m": "M", "medium": "M"}
# torchvision's rgb_to_grayscale weights (tensor path of ColorJitter / RandomGrayscale).
_GRAY = (0.2989, 0.587, 0.114)
MARGIN_MODES = ("absolute", "relative")
MARGIN_TARGETS = ("student", "autoencoder")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def default_efficientad_config() -> ml_collections.ConfigDict:
    """Every ``config.efficientad`` key, with EfficientAD's published values."""
    c = ml_collections.ConfigDict()
    c.model_size = "S"  # S | M (EfficientAD-S / -M); teacher.arch must be pdn_small / pdn_medium
    c.out_channels = 384  # teacher channels; the student has twice as many
    c.channels_divisor = 1  # >1 divides every width (tests only; needs a random teacher)
    c.hard_quantile = 0.999  # hard loss: mean of the distances >= this quantile
    c.jitter = 0.2  # ColorJitter strength of the AE branch (brightness, contrast, saturation)
    c.penalty_dir = ""  # folder of natural images (ImageNet train in the paper); "" = no penalty
    c.penalty_max_images = 2000  # at most this many (seeded choice) are kept on the device
    c.penalty_grayscale = 0.3  # RandomGrayscale probability of the penalty images
    c.map_padding = 4  # zero padding (feature pixels) of each map before upsampling
    # Convolutions: auto = im2col matmuls for training on the CPU (XLA:CPU's conv kernel
    # gradients are slow) and lax.conv otherwise (inference, GPU, TPU); xla | im2col
    # force one everywhere. Same numbers up to float summation order.
    c.conv_impl = "auto"
    # DFSC margin (Lee & Kim 2024; reconstruction, see the module docstring).
    c.margin_weight = 0.0  # w; 0 = EfficientAD exactly
    # What the hinge keeps at least the gap away from the teacher, on the distinctive
    # positions: "student" = the student's global branch, relu(gap - ||S_ae - T||^2)
    # (gradient into the student only); "autoencoder" = the autoencoder,
    # relu(gap - ||T - A||^2) (gradient into the autoencoder only; the published form).
    c.margin_target = "student"
    # The hinge's gap: "absolute" = margin, on channel-mean squared distances of
    # normalized teacher features; "relative" = margin * ||T - A||^2 at that position
    # (degenerate with margin_target="autoencoder": see the module docstring).
    c.margin_mode = "absolute"
    c.margin = 0.5  # m
    c.margin_quantile = 0.9  # q: positions with ||T - A||^2 above it are "distinctive"
    return c


def efficientad_settings(config) -> ml_collections.ConfigDict:
    """``config.efficientad`` merged over the defaults; unknown keys are an error."""
    out = default_efficientad_config()
    given = config.get("efficientad", None)
    if given is not None:
        unknown = sorted(set(given.keys()) - set(out.keys()))
        if unknown:
            raise ValueError(
                f"Unknown config.efficientad key(s) {unknown}. Known keys: {sorted(out.keys())}.")
        out.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
    size = _SIZE_ALIASES.get(str(out.model_size).lower(), str(out.model_size))
    if size not in _ARCH_OF_SIZE:
        raise ValueError(f"config.efficientad.model_size={out.model_size!r}: use 'S' or 'M'.")
    out.model_size = size
    if not 0.0 < float(out.hard_quantile) < 1.0:
        raise ValueError("config.efficientad.hard_quantile must be in (0, 1) (paper: 0.999).")
    if not 0.0 <= float(out.margin_quantile) < 1.0:
        raise ValueError("config.efficientad.margin_quantile must be in [0, 1) (e.g. 0.9).")
    if out.margin_mode not in MARGIN_MODES:
        raise ValueError(f"config.efficientad.margin_mode must be one of {MARGIN_MODES}.")
    if out.margin_target not in MARGIN_TARGETS:
        raise ValueError(f"config.efficientad.margin_target must be one of {MARGIN_TARGETS}.")
    if (float(out.margin_weight) > 0 and out.margin_target == "autoencoder"
            and out.margin_mode == "relative"):
        log.warning(
            "config.efficientad: margin_target='autoencoder' with margin_mode='relative' makes "
            "the hinge relu((margin - 1) * ||T - A||^2): %s. Use margin_mode='absolute'.",
            "never active (margin <= 1)" if float(out.margin) <= 1 else
            "never satisfied (margin > 1), a plain push of the autoencoder away from the teacher")
    if out.conv_impl not in CONV_IMPLS:
        raise ValueError(f"config.efficientad.conv_impl must be one of {CONV_IMPLS}.")
    if float(out.margin_weight) < 0:
        raise ValueError("config.efficientad.margin_weight must be >= 0 (0 = plain EfficientAD).")
    if int(out.channels_divisor) < 1 or int(out.out_channels) % int(out.channels_divisor):
        raise ValueError("config.efficientad.channels_divisor must be >= 1 and divide out_channels.")
    return out


# ---------------------------------------------------------------------------
# Pure functions: augmentation and losses
# ---------------------------------------------------------------------------

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


def dfsc_margin_loss(teacher: jax.Array, ae: jax.Array, student_ae: Optional[jax.Array],
                     margin: float, quantile: float, mode: str = "absolute",
                     with_active: bool = False, target: str = "student"):
    """DFSC margin (see the module docstring, and docs/METHODS.md "DFSC margin").

    ``teacher`` (normalized T), ``ae`` (A) and ``student_ae`` (S[384:]) are
    (N, H, W, C) maps of the augmented image. Distinctive positions: those
    whose channel-mean ``d_ta = (T - A)^2`` is strictly above its ``quantile``
    over the batch (linear interpolation, as torch.quantile). On them the loss
    is the mean of ``relu(gap - d)``, 0 if there is none, with ``d`` the
    channel-mean squared distance to the teacher of:

    * ``target="student"``: the student's global branch, ``d = (S_ae - T)^2``;
      the gradient reaches only ``student_ae``;
    * ``target="autoencoder"``: the autoencoder itself, ``d = (T - A)^2``
      (``student_ae`` is not used and may be None); the gradient reaches only
      ``ae``.

    ``mode`` sets the gap: "absolute", ``gap = margin`` (the distance scale of
    normalized teacher features); "relative", ``gap = margin * d_ta`` at that
    position. The teacher, the selection and the gap carry no gradient.
    ``with_active`` also returns the fraction of distinctive positions whose
    hinge is active.
    """
    if mode not in MARGIN_MODES:
        raise ValueError(f"DFSC margin mode {mode!r}: use one of {MARGIN_MODES}.")
    if target not in MARGIN_TARGETS:
        raise ValueError(f"DFSC margin target {target!r}: use one of {MARGIN_TARGETS}.")
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    a = ae.astype(jnp.float32)
    d_ta = jnp.mean((t - jax.lax.stop_gradient(a)) ** 2, axis=-1)
    threshold = jnp.quantile(d_ta.reshape(-1), quantile)
    selected = d_ta > threshold
    if target == "student":
        d = jnp.mean((student_ae.astype(jnp.float32) - t) ** 2, axis=-1)
    else:
        d = jnp.mean((t - a) ** 2, axis=-1)  # same value as d_ta, with A's gradient
    gap = margin * d_ta if mode == "relative" else margin
    hinge = jax.nn.relu(gap - d)
    count = jnp.maximum(jnp.sum(selected), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(selected, hinge, 0.0)) / count
    if not with_active:
        return loss
    return loss, jnp.sum(selected & (hinge > 0)) / count


def kth_largest(x: jax.Array, ks) -> jax.Array:
    """Exact k-th largest values (k 1-based, one per entry of ``ks``) of the
    float32 array ``x`` (flattened), without sorting: 32 bisection steps on
    the order-preserving uint32 image of the floats, each one counting pass.
    On the CPU this is ~10x faster than the sort behind jnp.quantile."""
    u = jax.lax.bitcast_convert_type(x.reshape(-1).astype(jnp.float32), jnp.uint32)
    s = jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))
    ks = jnp.asarray(ks, jnp.int32)
    lo = jnp.zeros(ks.shape, jnp.uint32)
    hi = jnp.full(ks.shape, 0xFFFFFFFF, jnp.uint32)

    def body(_, carry):  # invariant: count(s >= lo) >= k > count(s > hi)
        lo, hi = carry
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = jnp.sum((s[None, :] >= mid[:, None]).astype(jnp.int32), axis=1) >= ks
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    bits = jnp.where((lo >> 31) == 1, lo & jnp.uint32(0x7FFFFFFF), ~lo)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def hard_feature_loss(distance: jax.Array, quantile: float = 0.999) -> jax.Array:
    """EfficientAD's hard loss, the value of :func:`kdjax.losses.hard_feature_loss`
    (mean of the distances >= their ``quantile``, linear interpolation computed
    in float32 as jnp.quantile / torch.quantile do), with the two order
    statistics found by :func:`kth_largest` instead of a full sort. NaN in,
    NaN out (so divergence is still caught)."""
    d = distance.reshape(-1).astype(jnp.float32)
    n = d.shape[0]
    pos = np.float32(np.float32(quantile) * np.float32(n - 1))
    lo = int(min(max(np.floor(pos), 0), n - 1))
    hi = int(min(max(np.ceil(pos), 0), n - 1))
    w_hi = np.float32(pos - np.float32(lo))
    w_lo = np.float32(1.0) - w_hi
    v = kth_largest(jax.lax.stop_gradient(d), [n - lo, n - hi])  # ascending a[lo], a[hi]
    q = v[0] * w_lo + v[1] * w_hi
    keep = d >= q
    out = jnp.sum(jnp.where(keep, d, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    return jnp.where(jnp.any(jnp.isnan(d)), jnp.nan, out)


def stepped_adam(learning_rate: float, total_steps: int, weight_decay: float = 1e-5,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 decay_at: float = 0.95, gamma: float = 0.1) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay) with StepLR(step_size=int(decay_at*total), gamma).

    torch's Adam adds ``weight_decay * param`` to the gradient before the
    moment estimates (L2, not AdamW); the learning rate of update ``i``
    (0-based) is ``lr * gamma ** (i // step_size)``.
    """
    step_size = int(decay_at * total_steps)
    if step_size >= 1:
        schedule = optax.exponential_decay(learning_rate, step_size, gamma, staircase=True)
    else:
        schedule = optax.constant_schedule(learning_rate)
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


def pad_and_upsample(maps: jax.Array, size: Tuple[int, int], padding: int) -> jax.Array:
    """(N, h, w) maps -> zero-padded by ``padding`` on each side -> bilinear
    (align_corners=False) to ``size``, as the reference's
    ``F.pad(m, (4, 4, 4, 4))`` + ``F.interpolate(m, size, mode='bilinear')``."""
    p = int(padding)
    if p:
        maps = jnp.pad(maps, ((0, 0), (p, p), (p, p)))
    return ops.resize_bilinear(maps, tuple(size), align_corners=False)


# ---------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------

def load_penalty_images(folder: str, size: int, max_images: int, seed: int) -> np.ndarray:
    """Natural images for the penalty, as the reference prepares them: resize
    to 2*size x 2*size (PIL bilinear, antialiased as torchvision's Resize on
    PIL images), centre crop size x size. RandomGrayscale is applied on the
    device at each step. Returns uint8 (N, size, size, 3); a seeded choice of
    at most ``max_images`` of the files found (recursively) under ``folder``.
    """
    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(
            f"config.efficientad.penalty_dir={folder!r} is not a directory. Point it at a folder "
            "of natural images (the paper uses the ImageNet training set) or set it to '' to "
            "train without the penalty.")
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(_IMAGE_EXTS)]
    files.sort()
    if not files:
        raise ValueError(f"No images ({', '.join(_IMAGE_EXTS)}) found under penalty_dir {folder!r}.")
    if len(files) > max_images:
        pick = np.random.default_rng(seed).choice(len(files), max_images, replace=False)
        files = [files[i] for i in sorted(pick)]
    out = np.empty((len(files), size, size, 3), np.uint8)
    off = size // 2
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB").resize((2 * size, 2 * size), Image.BILINEAR)
        a = np.asarray(im)
        out[i] = a[off:off + size, off:off + size]
    return out


def penalty_batch(penalty_u8: jax.Array, rng: jax.Array, n: int, gray_p: float,
                  dtype=jnp.float32) -> jax.Array:
    """``n`` random penalty images, each grayscale with probability ``gray_p``, normalized."""
    k_idx, k_gray = jax.random.split(rng)
    idx = jax.random.randint(k_idx, (n,), 0, penalty_u8.shape[0])
    x = penalty_u8[idx].astype(jnp.float32) / 255.0
    to_gray = jax.random.uniform(k_gray, (n,)) < gray_p
    x = jnp.where(to_gray[:, None, None, None], jnp.broadcast_to(grayscale(x), x.shape), x)
    mean = jnp.asarray(ops.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(ops.IMAGENET_STD, jnp.float32)
    return ((x - mean) / std).astype(dtype)


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------

class EfficientAD(Method):
    """EfficientAD-S/-M with the optional DFSC margin (config.efficientad.margin_weight)."""

    name = "efficientad"
    map_names = ("local", "global")
    normalize_with_validation = True

    def __init__(self, config):
        super().__init__(config)
        self.settings = efficientad_settings(config)
        s = self.settings
        self.size = s.model_size
        self.arch = _ARCH_OF_SIZE[self.size]
        arch = str(config.teacher.get("arch", self.arch))
        if arch not in (self.arch, "pdn"):
            raise ValueError(
                f"teacher.arch={arch!r} does not match efficientad.model_size={self.size!r}: "
                f"pass --config.teacher.arch={self.arch} (and that teacher's weights), or "
                f"change --config.efficientad.model_size.")
        self.divisor = int(s.channels_divisor)
        if self.divisor != 1 and str(config.teacher.weights) != "random":
            raise ValueError("config.efficientad.channels_divisor != 1 only works with "
                             "teacher.weights='random' (tests and demos).")
        self.channels = int(s.out_channels) // self.divisor
        self.compute_dtype = (jnp.bfloat16 if config.train.get("compute_dtype", "float32")
                              == "bfloat16" else jnp.float32)
        self.margin_weight = float(s.margin_weight)
        self._teacher_desc = "none"
        self._build_modules(int(config.data.image_size))

    def _build_modules(self, image_size: int):
        self.out_size = pdn_output_size(image_size, self.size)
        if self.out_size < 1:
            raise ValueError(f"data.image_size={image_size} is too small for the PDN.")
        impl = str(self.settings.conv_impl)
        train_impl = impl  # "auto": im2col on the CPU, lax.conv elsewhere
        eval_impl = "xla" if impl == "auto" else impl

        def modules(conv_impl):
            return (PDN(self.size, self.channels, dtype=self.compute_dtype,
                        width_divisor=self.divisor, conv_impl=conv_impl),
                    PDN(self.size, 2 * self.channels, dtype=self.compute_dtype,
                        width_divisor=self.divisor, conv_impl=conv_impl),
                    Autoencoder(self.channels, self.out_size, dtype=self.compute_dtype,
                                width_divisor=self.divisor, conv_impl=conv_impl))

        # Same parameters, two computations: training (loss) and inference
        # (prepare, maps); see config.efficientad.conv_impl.
        _, self.student_train, self.ae_train = modules(train_impl)
        self.teacher, self.student, self.ae = modules(eval_impl)

    # --- construction -----------------------------------------------------
    def _teacher_variables(self, image_shape):
        w = str(self.config.teacher.weights)
        dummy = jnp.zeros((1,) + tuple(image_shape[1:]), jnp.float32)
        try:
            from kdjax import weights
        except ImportError as e:  # pragma: no cover - kdjax.weights ships with kdjax
            raise ImportError("kdjax.weights is needed to load the PDN teacher.") from e
        _, variables, desc = weights.load_teacher_described(self.arch, w)
        expected = jax.eval_shape(self.teacher.init, jax.random.PRNGKey(0), dummy)
        exp_shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected["params"])
        got_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables["params"])
        if exp_shapes != got_shapes:
            raise ValueError(
                f"The teacher weights {w!r} do not fit {self.arch} with {self.channels} output "
                f"channels: expected {exp_shapes}, got {got_shapes}. Use the teacher file of "
                f"EfficientAD-{self.size} (models/teacher_{'small' if self.size == 'S' else 'medium'}"
                ".pth of nelson1425/EfficientAD, ported with tools/port_weights.py).")
        self._teacher_desc = desc
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables["params"])
        return {"params": params}

    def init(self, rng, image_shape):
        n, h, w, c = image_shape
        if h != w or c != 3:
            raise ValueError(f"EfficientAD needs square RGB inputs; got batches of {image_shape}.")
        if h != int(self.config.data.image_size):
            self._build_modules(h)
        k_s, k_a = jax.random.split(rng)
        dummy = jnp.zeros((1, h, w, 3), jnp.float32)
        # One compiled initializer for student and autoencoder (and a random teacher).
        random_teacher = str(self.config.teacher.weights) == "random"

        @xla.jit
        def init_all(k_s, k_a, k_t):
            out = {"student": self.student.init(k_s, dummy)["params"],
                   "ae": self.ae.init(k_a, dummy)["params"]}
            if random_teacher:
                out["teacher"] = self.teacher.init(k_t, dummy)["params"]
            return out

        # The random teacher uses a fixed key: the same teacher in every run.
        made = init_all(k_s, k_a, jax.random.PRNGKey(0))
        params = {"student": made["student"], "ae": made["ae"]}
        if random_teacher:
            frozen = {"teacher": {"params": made["teacher"]}}
            self._teacher_desc = (f"RANDOM {self.arch} (fixed key 0, channels_divisor "
                                  f"{self.divisor})")
            log.warning("EfficientAD teacher %s has RANDOM weights: results are meaningless.",
                        self.arch)
        else:
            frozen = {"teacher": self._teacher_variables(image_shape)}
        s = self.settings
        if s.penalty_dir:
            frozen["penalty"] = jnp.asarray(load_penalty_images(
                str(s.penalty_dir), h, int(s.penalty_max_images), int(self.config.seed)))
            log.info("EfficientAD penalty: %d natural images from %s",
                     frozen["penalty"].shape[0], s.penalty_dir)
        else:
            log.info("EfficientAD: no penalty images (config.efficientad.penalty_dir is empty); "
                     "training without the pretraining penalty, as the reference does with "
                     "--imagenet_train_path none.")
        state = {"teacher_mean": jnp.zeros((self.channels,), jnp.float32),
                 "teacher_std": jnp.ones((self.channels,), jnp.float32)}
        return {"params": params, "state": state, "frozen": frozen}

    def teacher_description(self) -> str:
        return self._teacher_desc

    def inference_init(self, image_shape):
        """The frozen teacher for a saved model: the same random teacher (fixed
        key 0) as :meth:`init`, or the weights of ``teacher.weights``."""
        h = int(image_shape[1])
        if h != int(self.config.data.image_size):
            self._build_modules(h)
        if self.config.get("init_from", ""):  # the reference's teacher.pth beside its student
            from kdjax import weights

            ref = weights.load_reference_efficientad(
                str(self.config.init_from), model_size=self.size,
                out_channels=int(self.settings.out_channels), channels_divisor=self.divisor)
            self.teacher_source = os.path.join(str(self.config.init_from), "teacher.pth")
            return {"teacher": {"params": ref["teacher"]["params"]}}
        if str(self.config.teacher.weights) == "random":
            dummy = jnp.zeros((1, h, h, 3), jnp.float32)
            params = xla.jit(lambda k: self.teacher.init(k, dummy)["params"])(
                jax.random.PRNGKey(0))
            self._teacher_desc = f"RANDOM {self.arch} (fixed key 0, channels_divisor {self.divisor})"
            return {"teacher": {"params": params}}
        return {"teacher": self._teacher_variables(image_shape)}

    def import_reference(self, variables, path):
        """A directory with the reference reproduction's teacher.pth, student.pth and
        autoencoder.pth (``torch.save(model.state_dict())``). The teacher's channel
        statistics are then computed from the training images (:meth:`prepare`)."""
        from kdjax import weights

        ref = weights.load_reference_efficientad(
            path, model_size=self.size, out_channels=int(self.settings.out_channels),
            channels_divisor=self.divisor)
        frozen = {**variables["frozen"], "teacher": {"params": ref["teacher"]["params"]}}
        params = {"student": ref["student"]["params"], "ae": ref["ae"]["params"]}
        self._teacher_desc = f"{self.arch} weights from {os.path.join(path, 'teacher.pth')}"
        self.teacher_source = os.path.join(path, "teacher.pth")
        return {**variables, "params": params, "frozen": frozen}

    def prepare(self, variables, train_batches: Callable[[], Iterator[jax.Array]]):
        """Teacher channel statistics over the training set (docs/METHODS.md):
        mean = mean over images of each image's spatial mean; std = sqrt(mean
        over images of the spatial mean of (T - mean)^2). Two passes, as the
        reference; accumulated per image in float64 on the host."""
        teacher_vars = variables["frozen"]["teacher"]

        @xla.jit
        def stats(v, x, m):  # one compiled function serves both passes
            t = self.teacher.apply(v, x).astype(jnp.float32)
            return jnp.mean(t, axis=(1, 2)), jnp.mean((t - m) ** 2, axis=(1, 2))

        zero = jnp.zeros((self.channels,), jnp.float32)
        total, count = np.zeros((self.channels,), np.float64), 0
        for batch in train_batches():
            total += np.asarray(jax.device_get(stats(teacher_vars, batch, zero)[0]),
                                np.float64).sum(0)
            count += batch.shape[0]
        if count == 0:
            raise ValueError("EfficientAD.prepare: the training set yielded no images.")
        mean = total / count
        mean_dev = jnp.asarray(mean, jnp.float32)
        total_sq = np.zeros((self.channels,), np.float64)
        for batch in train_batches():
            total_sq += np.asarray(jax.device_get(stats(teacher_vars, batch, mean_dev)[1]),
                                   np.float64).sum(0)
        # Floor: a constant channel (possible with random teachers) would divide 0 by 0.
        std = np.maximum(np.sqrt(total_sq / count), 1e-8)
        return {"teacher_mean": jnp.asarray(mean, jnp.float32),
                "teacher_std": jnp.asarray(std, jnp.float32)}

    def optimizer(self, total_steps: int):
        """torch Adam(lr, weight_decay=train.weight_decay) + StepLR(0.95 * steps, 0.1)."""
        t = self.config.train
        return stepped_adam(float(t.learning_rate), int(total_steps),
                            weight_decay=float(t.get("weight_decay", 0.0)),
                            b1=float(t.get("b1", 0.9)), b2=float(t.get("b2", 0.999)))

    def learning_rates(self, step: int, total_steps: int):
        """StepLR's rate: train.learning_rate, times 0.1 from 0.95 * total_steps on."""
        lr = float(self.config.train.learning_rate)
        step_size = int(0.95 * int(total_steps))
        return {"learning_rate": lr * 0.1 ** (int(step) // step_size) if step_size >= 1 else lr}

    # --- forward pieces ---------------------------------------------------
    def _teacher_raw(self, frozen, images, module=None):
        return (module or self.teacher).apply(frozen["teacher"], images).astype(jnp.float32)

    @staticmethod
    def _normalize_teacher(state, t):
        return jax.lax.stop_gradient((t - state["teacher_mean"]) / state["teacher_std"])

    def _teacher(self, frozen, state, images, module=None):
        return self._normalize_teacher(state, self._teacher_raw(frozen, images, module))

    def _student(self, params, images):
        return self.student.apply({"params": params["student"]}, images).astype(jnp.float32)

    def _ae(self, params, images, train: bool, rng=None, module=None):
        module = module or self.ae
        rngs = {"dropout": rng} if train else None
        return module.apply({"params": params["ae"]}, images, train=train,
                            rngs=rngs).astype(jnp.float32)

    # --- training ---------------------------------------------------------
    def teacher_cache(self, frozen, images):
        """The raw (unnormalized) teacher output of the clean image; the
        normalization with the channel statistics happens in the loss."""
        return self._teacher_raw(frozen, images.astype(jnp.float32))

    def loss(self, params, state, frozen, images, rng, cached=None):
        s = self.settings
        c = self.channels
        n = images.shape[0]
        k_jit, k_pen, k_drop = jax.random.split(rng, 3)
        images = images.astype(jnp.float32)
        images_ae = color_jitter_ae(images, k_jit, float(s.jitter))
        # One teacher call (unless the engine cached the clean image's output)
        # and one student call on the stacked batch [image, augmented image
        # (, penalty image)]: per-sample identical to the reference's separate
        # calls (no batch statistics anywhere). The frozen teacher needs no
        # gradient: its inference convolutions are used.
        if cached is None:
            t = self._teacher(frozen, state, jnp.concatenate([images, images_ae], 0))
            t_st, t_ae = t[:n], t[n:]
        else:
            t_st = self._normalize_teacher(state, cached)
            t_ae = self._teacher(frozen, state, images_ae)
        student_in = [images, images_ae]
        use_penalty = "penalty" in frozen
        if use_penalty:
            student_in.append(penalty_batch(frozen["penalty"], k_pen, n,
                                            float(s.penalty_grayscale)))
        # The student's last convolution computes only the half each image uses
        # (local half: image and penalty image; global half: augmented image).
        groups = [(n, 0, c), (n, c, 2 * c)] + ([(n, 0, c)] if use_penalty else [])
        outs = self.student_train.apply({"params": params["student"]},
                                        jnp.concatenate(student_in, 0), groups=groups)
        s_st, s_ae = outs[0].astype(jnp.float32), outs[1].astype(jnp.float32)
        a = self._ae(params, images_ae, True, k_drop, self.ae_train)

        distance_st = (t_st - s_st) ** 2
        loss_hard = hard_feature_loss(distance_st, float(s.hard_quantile))
        loss_penalty = (jnp.mean(outs[2].astype(jnp.float32) ** 2) if use_penalty
                        else jnp.zeros((), jnp.float32))
        loss_ae = jnp.mean((t_ae - a) ** 2)
        loss_stae = jnp.mean((a - s_ae) ** 2)
        total = loss_hard + loss_ae + loss_stae
        if use_penalty:
            total = total + loss_penalty
        if self.margin_weight != 0.0:  # decided at trace time: w = 0 traces EfficientAD only
            loss_margin, margin_active = dfsc_margin_loss(
                t_ae, a, s_ae, float(s.margin), float(s.margin_quantile), str(s.margin_mode),
                with_active=True, target=str(s.margin_target))
            total = total + self.margin_weight * loss_margin
        else:
            loss_margin = margin_active = jnp.zeros((), jnp.float32)
        metrics = {"loss": total, "hard": loss_hard, "ae": loss_ae, "stae": loss_stae,
                   "penalty": loss_penalty, "margin": loss_margin,
                   # fraction of the distinctive positions whose hinge is active
                   "margin_active": margin_active}
        return total, (state, metrics)

    # --- inference --------------------------------------------------------
    def raw_maps(self, params, state, frozen, images) -> Dict[str, jax.Array]:
        """The reference's ``map_st`` / ``map_ae`` at the PDN's resolution (N, 56, 56)."""
        c = self.channels
        t = self._teacher(frozen, state, images)
        out = self._student(params, images)
        a = self._ae(params, images, False)
        return {"local": jnp.mean((t - out[..., :c]) ** 2, axis=-1),
                "global": jnp.mean((a - out[..., c:]) ** 2, axis=-1)}

    def maps(self, params, state, frozen, images):
        """{"local", "global"} at the PDN's resolution: the engine normalizes
        them with validation quantiles there (the reference's
        ``map_normalization`` works on these maps), combines them, and then
        :meth:`finish_maps` pads and upsamples."""
        return self.raw_maps(params, state, frozen, images)

    def finish_maps(self, maps, size):
        """The reference's test-time ``F.pad(map_combined, (4, 4, 4, 4))`` (zeros,
        AFTER normalization) and bilinear ``F.interpolate`` to the input size."""
        return pad_and_upsample(maps, tuple(size), int(self.settings.map_padding))
