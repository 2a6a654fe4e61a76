"""CAD / DSKD: Contextual Affinity Distillation (Zhang, Suganuma, Okatani, WACV 2024;
arXiv 2307.03101), as reconstructed in docs/METHODS.md ("CAD").

No official code is public. The published description fixes the frame: an
ImageNet WRN50 teacher, a LOCAL student that reproduces the teacher's
multi-scale features with the per-layer cosine loss (structural anomalies),
and a GLOBAL student fed through a Global Context Condensing Block (GCCB)
that condenses the teacher's high-level features along the channel
dimension, trained with a contextual affinity loss whose discrepancy also
scores anomalies (logical anomalies). Everything below that is not in that
description is kdjax's choice, and each is a key of ``config.cad``
(defaults in ``default_config()``):

Local student (fixed): exactly RD4AD (this class subclasses
``kdjax.methods.rd4ad.RD4AD``): OCBE + mirrored decoder, flattened cosine
loss over layer1..3, RD4AD's anomaly map ("local" component).

Global branch (``kdjax.models.cad``):
- ``gccb_input``: "layer3" (teacher layer3, default) or "ocbe" (the local
  student's OCBE output, captured from the same forward pass).
  ``gccb_stop_gradient`` (default True) keeps the global losses from
  changing the OCBE, so the local student trains exactly as RD4AD.
- ``d`` (128): condensed channel count (divided by teacher.width_divisor,
  kept a multiple of ``heads``). ``pool_grid`` (8): the condensed map is
  average-pooled to 8x8 (from 16x16 at a 256 input); narrow channels plus
  a coarse grid is the bottleneck that stops the global student from copying
  local detail, so it has to predict the teacher from context.
- ``mixing``: "attention" (default; ``attention_blocks`` pre-LN transformer
  blocks with ``heads`` heads and a learned position embedding, since
  logical constraints concern where things are) or "pool" (global-average
  context vector broadcast back and fused) or "none" (ablation).
- ``global_layers`` (layer2, layer3): the teacher taps the global student
  predicts; ``decoder_widths`` (256, 128, 64 at the layer3/2/1 stages, also
  divided by width_divisor) and ``decoder_blocks`` (2 conv3x3+BN+ReLU per
  stage).

Loss = RD4AD local loss
     + ``global_weight`` (1.0) * cosine feature loss of the global student on
       ``global_layers`` (``global_feature_loss``: "flat" = RD4AD's flattened
       cosine, "pixel" = mean per-pixel cosine distance)
     + ``affinity_weight`` (1.0) * contextual affinity loss: for each tap in
       ``affinity_layers`` (layer2, layer3), the mean over all N*HW*HW entries
       of |A_teacher - A_global| (``affinity_distance`` "l1", or "l2"),
       A = Fn Fn^T with Fn per-position L2-normalized; summed over taps.
       ``affinity_weight`` = 0 is the "no affinity loss" ablation (the
       affinity term is then not computed at all).
  The affinity matrices are never materialized: ``kdjax.losses`` walks over
  ``affinity_block`` query rows at a time with rematerialization
  (``affinity_precision``: matmul precision, "default" | "high" | "highest").

Optimizer: the engine's (Adam, train.learning_rate and betas) over both
students; ``global_learning_rate`` (default -1: the same) >= 0 gives the
global branch its own rate (``optax.multi_transform`` over the "local" and
"global" parameter groups).

Maps (``map_names = ("local", "global")``):
- local: RD4AD's map of the local student (sigma ``eval.gaussian_sigma``, 4).
- global (``global_map`` = "affinity", default): for each tap in
  ``affinity_layers``, D[p] = mean over q != p of |A_t[p,q] - A_g[p,q]|,
  bilinearly upsampled (align_corners=True) to the input size, summed over
  taps, Gaussian-filtered with ``global_sigma`` (default -1: the local map's
  sigma, ``eval.gaussian_sigma``). "cosine" uses the
  global student's per-pixel cosine distance on ``global_layers`` instead,
  "affinity+cosine" sums both.
The engine normalizes each component with its validation quantiles
(config.eval.quantiles) and sums them with config.eval.map_weights, so the
local-only / global-only / both ablations are map weights only.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import losses, ops
from kdjax.errors import ConfigError
from kdjax.methods.rd4ad import RD4AD, TAPS, rd_anomaly_map
from kdjax.models.cad import MIXINGS

GLOBAL_MAPS = ("affinity", "cosine", "affinity+cosine")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.cad`` (documented in this module's docstring)."""
    c = ml_collections.ConfigDict()
    c.gccb_input = "layer3"  # layer3 | ocbe
    c.gccb_stop_gradient = True
    c.d = 128
    c.mixing = "attention"  # attention | pool | none
    c.heads = 4
    c.attention_blocks = 1
    c.mlp_ratio = 2
    c.pos_embed = True
    c.pool_grid = 8  # 0: no spatial pooling
    c.decoder_widths = (256, 128, 64)
    c.decoder_blocks = 2
    c.global_layers = ("layer2", "layer3")
    c.global_weight = 1.0
    c.global_feature_loss = "flat"  # flat | pixel
    c.affinity_layers = ("layer2", "layer3")
    c.affinity_weight = 1.0
    c.affinity_distance = "l1"  # l1 | l2
    c.affinity_block = 256  # query rows per block of the chunked affinity computation
    c.affinity_precision = "default"  # default | high | highest
    c.global_map = "affinity"  # affinity | cosine | affinity+cosine
    c.global_sigma = -1.0  # < 0: the local map's sigma (eval.gaussian_sigma, default 4)
    # Learning rate of the global branch (GCCB + global student). < 0: the same
    # optimizer as the local student (train.learning_rate, train.b1/b2), one Adam over
    # all parameters; >= 0: the same optimizer kind with this rate for the global
    # group only (optax.multi_transform over {"local", "global"}).
    c.global_learning_rate = -1.0
    return c


def check_settings(cad, config=None) -> None:
    """Refuse ``config.cad`` values that cannot run (ConfigError, one line)."""
    def bad(key, why):
        raise ConfigError(f"cad.{key}={cad[key]!r}: {why}")

    if cad.gccb_input not in ("layer3", "ocbe"):
        bad("gccb_input", "use 'layer3' or 'ocbe'.")
    if cad.mixing not in MIXINGS:
        bad("mixing", f"use one of {', '.join(MIXINGS)}.")
    for key in ("global_layers", "affinity_layers"):
        taps = tuple(cad[key])
        if any(t not in TAPS for t in taps) or (key == "global_layers" and not taps):
            bad(key, f"use a non-empty subset of {TAPS}.")
    missing = [t for t in cad.affinity_layers if t not in tuple(cad.global_layers)]
    if missing:
        bad("affinity_layers", f"{missing} are not in cad.global_layers "
            f"{tuple(cad.global_layers)}: the global student must predict every tap its "
            "affinity is compared on.")
    if cad.global_map not in GLOBAL_MAPS:
        bad("global_map", f"use one of {', '.join(GLOBAL_MAPS)}.")
    if cad.global_map != "cosine" and not tuple(cad.affinity_layers):
        bad("affinity_layers", "the affinity map (cad.global_map) needs at least one tap; or "
            "set cad.global_map='cosine'.")
    if cad.global_feature_loss not in ("flat", "pixel"):
        bad("global_feature_loss", "use 'flat' or 'pixel'.")
    if cad.affinity_distance not in ("l1", "l2"):
        bad("affinity_distance", "use 'l1' or 'l2'.")
    if cad.affinity_precision not in losses.PRECISIONS:
        bad("affinity_precision", f"use one of {', '.join(losses.PRECISIONS)}.")
    for key in ("affinity_block", "heads", "attention_blocks", "mlp_ratio", "d"):
        if int(cad[key]) < 1:
            bad(key, "must be >= 1.")
    for key in ("pool_grid", "decoder_blocks"):
        if int(cad[key]) < 0:
            bad(key, "must be >= 0.")
    if len(tuple(cad.decoder_widths)) != 3 or min(int(w) for w in cad.decoder_widths) < 1:
        bad("decoder_widths", "needs 3 positive widths (layer3, layer2, layer1 stages).")
    for key in ("global_weight", "affinity_weight"):
        if not float(cad[key]) >= 0:
            bad(key, "must be a number >= 0.")


def resolve_config(config) -> ml_collections.ConfigDict:
    """``config.cad`` merged over the defaults and checked (:meth:`CAD.resolve_settings`)."""
    return CAD.resolve_settings(config)


class CAD(RD4AD):
    """Local RD4AD student + GCCB-fed global student with contextual affinity."""

    name = "cad"
    map_names = ("local", "global")

    @classmethod
    def default_settings(cls):
        return default_config()

    @classmethod
    def check_settings(cls, settings, config):
        check_settings(settings, config)

    def __init__(self, config, kernels=None):
        super().__init__(config, kernels)
        self.cad = self.settings
        size = int(config.data.image_size)
        self.global_branch = self.build_global(
            {k: v.shape for k, v in self.teacher_shapes((1, size, size, 3)).items()})

    # --- parts ------------------------------------------------------------
    def build_global(self, teacher_shapes: Dict[str, tuple]):
        """The GlobalBranch module for teacher taps of the given NHWC shapes."""
        from kdjax.models.cad import GlobalBranch

        c = self.cad
        div = max(int(self.config.teacher.width_divisor), 1)
        heads = int(c.heads)
        d = max(int(c.d) // div, heads)
        d = -(-d // heads) * heads if c.mixing == "attention" else d
        targets = tuple((k, int(teacher_shapes[k][1]), int(teacher_shapes[k][2]),
                         int(teacher_shapes[k][3])) for k in c.global_layers)
        return GlobalBranch(
            targets=targets, d=d, mixing=c.mixing, heads=heads,
            attention_blocks=int(c.attention_blocks), mlp_ratio=int(c.mlp_ratio),
            pos_embed=bool(c.pos_embed), pool_grid=int(c.pool_grid),
            widths=tuple(max(int(w) // div, 1) for w in c.decoder_widths),
            blocks=int(c.decoder_blocks), dtype=self.dtype, kernels=self.kernels)

    def local_forward(self, params, state, t, train: bool):
        """Local student outputs, new local state, and the OCBE output (or None)."""
        if self.cad.gccb_input != "ocbe":
            out, new_state = self.student_features(params, state, t, train)  # RD4AD's
            return out, new_state, None
        # Same forward pass, also capturing the output of the OCBE submodule ("bn").
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        mutable = (["batch_stats"] if train else []) + ["intermediates"]
        kw = {"capture_intermediates": (lambda mdl, _: mdl.name == "bn")}
        out, upd = self.student.apply(variables, t, train=train, mutable=mutable, **kw)
        new_state = {**state, "batch_stats": upd["batch_stats"]} if train else state
        return out, new_state, upd["intermediates"]["bn"]["__call__"][0]

    def global_forward(self, params, state, t, ocbe, train: bool):
        x = t["layer3"] if self.cad.gccb_input == "layer3" else ocbe
        if self.cad.gccb_stop_gradient:
            x = jax.lax.stop_gradient(x)
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        if train:
            out, upd = self.global_branch.apply(variables, x, train=True, mutable=["batch_stats"])
            return out, {**state, "batch_stats": upd["batch_stats"]}
        return self.global_branch.apply(variables, x, train=False), state

    def affinity_kwargs(self):
        c = self.cad
        return dict(distance=c.affinity_distance, block=int(c.affinity_block),
                    precision=c.affinity_precision)

    # --- Method contract --------------------------------------------------
    def optimizer(self, total_steps: int):
        """Adam (``Method.optimizer``: train.learning_rate and betas) over all
        parameters; with ``cad.global_learning_rate >= 0`` the global branch's group
        gets its own Adam at that rate (``optax.multi_transform``; Adam is
        per-parameter, so the local group's updates are those of the single optimizer)."""
        base = super().optimizer(total_steps)
        glr = float(self.cad.global_learning_rate)
        if glr < 0:
            return base
        return optax.multi_transform(
            {"local": base, "global": self.adam(glr)},
            lambda params: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()})

    def learning_rates(self, step: int, total_steps: int):
        out = super().learning_rates(step, total_steps)
        if float(self.cad.global_learning_rate) >= 0:
            out["learning_rate_global"] = float(self.cad.global_learning_rate)
        return out

    def init(self, rng, image_shape, teacher_variables):
        from kdjax.models.cad import host_init
        from kdjax.models.torch_init import seed_of

        size = int(self.config.data.image_size)
        if tuple(image_shape[1:]) != (size, size, 3):
            raise ValueError(f"CAD is built for data.image_size={size}: init got images of "
                             f"shape {tuple(image_shape)}.")
        r_local, r_global = jax.random.split(rng)
        local = super().init(r_local, image_shape, teacher_variables)
        shapes = {k: v.shape for k, v in self.teacher_shapes(image_shape).items()}
        if self.cad.gccb_input == "layer3":
            x = jax.ShapeDtypeStruct(shapes["layer3"], self.dtype)
        else:
            feats = {k: jax.ShapeDtypeStruct(shapes[k], self.dtype) for k in TAPS}
            x = jax.eval_shape(
                lambda f: self.local_forward(local["params"], local["state"], f, False)[2], feats)
        gvars = host_init(self.global_branch, seed_of(r_global), x, train=False)
        return {"params": {"local": local["params"], "global": gvars["params"]},
                "state": {"local": local["state"], "global": {"batch_stats": gvars["batch_stats"]}},
                "frozen": local["frozen"]}

    @classmethod
    def check_init_from(cls, path):
        from kdjax.errors import ConfigError

        raise ConfigError("config.init_from: CAD has no public reference code, so there is no "
                          "reference checkpoint to import; leave init_from empty.")

    def import_reference(self, variables, path):
        self.check_init_from(path)

    def loss(self, params, state, frozen, images, rng, cached=None):
        c = self.cad
        t = self.train_teacher_features(frozen, images, cached)
        s, local_state, ocbe = self.local_forward(params["local"], state["local"], t, True)
        local_loss = losses.flat_cosine_loss([t[k] for k in TAPS], [s[k] for k in TAPS])
        g, global_state = self.global_forward(params["global"], state["global"], t, ocbe, True)
        gl = tuple(c.global_layers)
        if c.global_feature_loss == "flat":
            global_loss = losses.flat_cosine_loss([t[k] for k in gl], [g[k] for k in gl])
        else:
            global_loss = sum(jnp.mean(losses.cosine_distance_map(t[k], g[k])) for k in gl)
        loss = local_loss + float(c.global_weight) * global_loss
        aff_loss = jnp.zeros((), jnp.float32)
        if float(c.affinity_weight) != 0.0 and tuple(c.affinity_layers):
            al = tuple(c.affinity_layers)
            aff_loss = losses.contextual_affinity_loss([t[k] for k in al], [g[k] for k in al],
                                                       **self.affinity_kwargs())
            loss = loss + float(c.affinity_weight) * aff_loss
        new_state = {"local": local_state, "global": global_state}
        return loss, (new_state, {"local_loss": local_loss, "global_loss": global_loss,
                                  "affinity_loss": aff_loss})

    def global_map(self, t, g, size) -> jax.Array:
        """The global component (N, H, W) from teacher and global-student taps."""
        c = self.cad
        total = 0.0
        if c.global_map in ("affinity", "affinity+cosine"):
            for k in c.affinity_layers:
                dmap = losses.affinity_discrepancy_map(t[k], g[k], **self.affinity_kwargs())
                total = total + ops.resize_bilinear(dmap, size, align_corners=True)
        if c.global_map in ("cosine", "affinity+cosine"):
            for k in c.global_layers:
                total = total + ops.resize_bilinear(losses.cosine_distance_map(t[k], g[k]), size,
                                                    align_corners=True)
        sigma = float(c.global_sigma)
        if sigma < 0:
            sigma = float(self.config.eval.gaussian_sigma)
        return ops.gaussian_blur(total, sigma)

    def maps(self, params, state, frozen, images):
        size = images.shape[1:3]
        t = self.teacher_features(frozen, images)
        s, _, ocbe = self.local_forward(params["local"], state["local"], t, False)
        g, _ = self.global_forward(params["global"], state["global"], t, ocbe, False)
        local = rd_anomaly_map(t, s, size, float(self.config.eval.gaussian_sigma))
        return {"local": local.astype(jnp.float32),
                "global": self.global_map(t, g, size).astype(jnp.float32)}
