"""CAD / DSKD: Contextual Affinity Distillation (Zhang, Suganuma, Okatani, WACV 2024;
arXiv 2307.03101), as reconstructed in docs/METHODS.md ("CAD / DSKD"): what the paper
fixes, each of kdjax's reconstruction choices and every ``config.cad`` key (defaults and
checks: kdjax/methods/cad_settings.py).

In short: the LOCAL student is exactly RD4AD (this class subclasses
``kdjax.methods.rd4ad.RD4AD``). A GLOBAL student, fed through the Global Context
Condensing Block (``kdjax.models.cad``: channel condensation, a coarse pooled grid,
attention over its positions), predicts the teacher's ``global_layers`` and is trained
with a cosine feature loss plus the contextual affinity loss (``kdjax.losses``: mean
|A_teacher - A_global| of the per-position cosine affinities, never materialized).
Maps: "local" (RD4AD's) and "global" (the affinity discrepancy of each position),
normalized with validation quantiles and summed with ``eval.map_weights`` by the engine.
``cad.global_learning_rate`` >= 0 gives the global branch its own Adam learning rate.
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
# The settings live in their own file; their names stay importable from here.
from kdjax.methods.cad_settings import GLOBAL_MAPS, check_settings, default_config  # noqa: F401


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
