"""EfficientAD (Batzner et al., WACV 2024) and the DFSC margin constraint (Lee & Kim 2024).

The recipe, with every setting and kdjax's reconstruction choices for DFSC:
docs/METHODS.md, sections "EfficientAD" and "DFSC margin". The reference is
the reproduction nelson1425/EfficientAD (``efficientad.py``), which this file
follows step by step:

* teacher: a frozen PDN (384 channels) whose outputs are normalized with the
  channel mean/std of the training set (two passes of the engine over the
  training images: :meth:`EfficientAD.prepare_statistic`);
* student: a PDN with 768 channels; its first 384 imitate the teacher (local
  branch), its last 384 imitate the autoencoder (global branch);
* autoencoder: sees the image after one of ColorJitter brightness / contrast /
  saturation 0.2, chosen at random (on the device, kdjax.augment);
* loss = hard loss (mean of the student-teacher squared distances at or above
  their 0.999 quantile) [+ penalty on a natural image] + AE loss + student-AE
  loss [+ w * DFSC margin, :func:`kdjax.losses.dfsc_margin_loss`; with
  ``margin_weight == 0`` the term is not even traced: EfficientAD exactly];
* maps: local = channel mean (T - S[:384])^2, global = channel mean
  (A - S[384:])^2 at the PDN's resolution (56x56 at 256 px); the engine
  normalizes each with the 0.9 / 0.995 quantiles of the validation maps at
  that resolution and combines them 0.5 / 0.5 (the reference's
  ``0.5 * map_st + 0.5 * map_ae`` of normalized maps); ``finish_maps`` then
  zero-pads the combined map by 4 pixels and upsamples it bilinearly to the
  input size, as the reference's test loop does.

Settings: ``config.efficientad`` (kdjax/methods/efficientad_settings.py lists every
key with its meaning).
"""

from __future__ import annotations

import logging
import os
from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import ops
from kdjax.augment import color_jitter_ae, penalty_images
from kdjax.errors import ConfigError
from kdjax.losses import dfsc_margin_loss, hard_feature_loss
from kdjax.methods.base import Method
# The settings live in their own file; their names stay importable from here.
from kdjax.methods.efficientad_settings import (_ARCH_OF_SIZE, check_settings,
                                                default_efficientad_config)
from kdjax.models.pdn import PDN, Autoencoder, pdn_output_size
from kdjax.optim import stepped_adam

log = logging.getLogger("kdjax")


def efficientad_settings(config) -> ml_collections.ConfigDict:
    """``config.efficientad`` merged over the defaults and checked
    (:meth:`EfficientAD.resolve_settings`)."""
    return EfficientAD.resolve_settings(config)


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------

class EfficientAD(Method):
    """EfficientAD-S/-M with the optional DFSC margin (config.efficientad.margin_weight)."""

    name = "efficientad"
    map_names = ("local", "global")
    normalize_with_validation = True
    applies_weight_decay = True
    removed_settings = ("conv_impl",)  # the convolutions are kdjax.backends' choice
    prepare_passes = 2  # the teacher's channel mean, then its std

    @classmethod
    def default_settings(cls):
        return default_efficientad_config()

    @classmethod
    def check_settings(cls, settings, config):
        check_settings(settings, config)

    def __init__(self, config, kernels=None):
        super().__init__(config, kernels)
        s = self.settings
        self.size = s.model_size
        self.arch = _ARCH_OF_SIZE[self.size]
        self.divisor = int(s.channels_divisor)
        self.channels = int(s.out_channels) // self.divisor
        self.margin_weight = float(s.margin_weight)
        image_size = int(config.data.image_size)
        self.out_size = pdn_output_size(image_size, self.size)
        if self.out_size < 1:
            raise ConfigError(f"data.image_size={image_size} is too small for the PDN.")

        def modules(conv):
            kw = dict(dtype=self.dtype, width_divisor=self.divisor, conv=conv)
            return (PDN(self.size, self.channels, **kw), PDN(self.size, 2 * self.channels, **kw),
                    Autoencoder(self.channels, self.out_size, **kw))

        # Same parameters, computed two ways (kdjax.backends): the training step's
        # convolutions and inference's (the frozen teacher always uses the latter).
        self.teacher, self.student, self.ae = modules(self.kernels.pdn_conv)
        _, self.student_train, self.ae_train = modules(self.kernels.pdn_conv_train)

    # --- the teacher --------------------------------------------------------
    @property
    def teacher_arch(self) -> str:
        return self.arch

    @property
    def teacher_width_divisor(self) -> int:
        return self.divisor

    def teacher_source(self) -> str:
        """``teacher.weights``, or with ``init_from`` the reference's teacher file there."""
        if self.config.get("init_from", ""):
            from kdjax import weights

            return weights.efficientad_reference_file(str(self.config.init_from), "teacher")
        return str(self.config.teacher.weights)

    def frozen_variables(self, teacher_variables):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                        teacher_variables["params"])
        return {"teacher": {"params": params}}

    def training_images(self):
        s = self.settings
        if not s.penalty_dir:
            return {}
        return {"penalty": {"folder": str(s.penalty_dir), "size": int(self.config.data.image_size),
                            "max_images": int(s.penalty_max_images),
                            "seed": int(self.config.seed)}}

    def notes(self):
        if self.settings.penalty_dir or self.config.get("init_from", ""):
            return []  # an imported model: how it was trained is not known here
        return ["Trained WITHOUT EfficientAD's ImageNet penalty (efficientad.penalty_dir is "
                "empty). The paper's numbers, and the reference reproduction's, assume it: give "
                "--config.efficientad.penalty_dir=<folder of ImageNet train images> to compare "
                "with them."]

    # --- construction -----------------------------------------------------
    def init(self, rng, image_shape, teacher_variables):
        n, h, w, c = image_shape
        size = int(self.config.data.image_size)
        if (h, w, c) != (size, size, 3):
            raise ValueError(f"EfficientAD is built for square RGB images of "
                             f"data.image_size={size}; init got batches of {image_shape}.")
        k_s, k_a = jax.random.split(rng)
        dummy = jnp.zeros((1, h, w, 3), jnp.float32)
        params = jax.jit(lambda k_s, k_a: {"student": self.student.init(k_s, dummy)["params"],
                                           "ae": self.ae.init(k_a, dummy)["params"]})(k_s, k_a)
        state = {"teacher_mean": jnp.zeros((self.channels,), jnp.float32),
                 "teacher_std": jnp.ones((self.channels,), jnp.float32)}
        return {"params": params, "state": state,
                "frozen": self.frozen_variables(teacher_variables)}

    @classmethod
    def check_init_from(cls, path):
        from kdjax import weights

        what = ("EfficientAD's init_from is a directory holding the reference EfficientAD's "
                "teacher.pth, student.pth and autoencoder.pth (torch.save(model.state_dict()), "
                "or the *_final.pth files its efficientad.py writes); leave init_from empty to "
                "train from scratch")
        if not os.path.isdir(path):
            raise ConfigError(f"init_from={path!r} is a file: {what}.")
        missing = [names[0] for names in weights.EFFICIENTAD_FILES.values()
                   if not any(os.path.isfile(os.path.join(path, n)) for n in names)]
        if missing:
            raise ConfigError(f"init_from={path!r} has no {', '.join(missing)}: {what}.")

    def import_reference(self, variables, path):
        """A directory with the reference reproduction's teacher.pth, student.pth and
        autoencoder.pth (``torch.save(model.state_dict())``): the student and the
        autoencoder (the engine loads the teacher from there, :meth:`teacher_source`).
        The teacher's channel statistics are then computed from the training images."""
        from kdjax import weights

        ref = weights.load_reference_efficientad(
            path, model_size=self.size, out_channels=int(self.settings.out_channels),
            channels_divisor=self.divisor)
        params = {"student": ref["student"]["params"], "ae": ref["ae"]["params"]}
        return {**variables, "params": params}

    def prepare_statistic(self, frozen, state, images):
        """The teacher's channel statistics (docs/METHODS.md), per image: the spatial
        mean of the raw teacher output (pass 0) and the spatial mean of (T - mean)^2
        with the mean of the state (pass 1). The engine averages them over the
        training set in float64."""
        t = self._teacher_raw(frozen, images)
        return {"mean": jnp.mean(t, axis=(1, 2)),
                "sq": jnp.mean((t - state["teacher_mean"]) ** 2, axis=(1, 2))}

    def prepare_update(self, index, state, means):
        if index == 0:
            return {**state, "teacher_mean": jnp.asarray(means["mean"], jnp.float32)}
        # Floor: a constant channel (possible with random teachers) would divide 0 by 0.
        std = np.maximum(np.sqrt(np.asarray(means["sq"], np.float64)), 1e-8)
        return {**state, "teacher_std": jnp.asarray(std, jnp.float32)}

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

    def loss(self, params, state, frozen, images, rng, cached=None, extra=None):
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
        use_penalty = bool(extra) and "penalty" in extra  # the engine's draw for this step
        if use_penalty:
            student_in.append(penalty_images(extra["penalty"], k_pen, float(s.penalty_grayscale)))
        # The student's last convolution computes only the half each image uses
        # (local half: image and penalty image; global half: augmented image).
        groups = [(n, 0, c), (n, c, 2 * c)] + (
            [(extra["penalty"].shape[0], 0, c)] if use_penalty else [])
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
        return ops.pad_and_upsample(maps, tuple(size), int(self.settings.map_padding))
