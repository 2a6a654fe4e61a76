"""MRKD: masked reverse knowledge distillation (Jiang, Cao, Shen, KBS 2023).

RD4AD plus two training-time masks (docs/METHODS.md):
- ILM (image-level masking): the student path sees OCBE(teacher(x~)) with x~
  an NSA "swap" anomaly of the same image (kdjax.methods.nsa, per-category
  settings); the target stays teacher(x) of the clean image.
- FLM (feature-level masking): each decoder output is zeroed at random
  positions (probability ``mrkd.mask_prob``, all channels), then a generation
  module (Conv3x3 -> ReLU -> Conv3x3) produces the student feature.
Inference is RD4AD's, through the generation modules without masks. The
official code also masks at test time (random evaluation); set
``mrkd.flm_at_test=True`` to reproduce that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.methods import nsa
from kdjax.methods.rd4ad import RD4AD, TAPS, rd_anomaly_map


def flm_masks(key, feats, prob: float):
    """{tap: (N, h, w, 1)} keep-masks: 0 with probability ``prob`` per position."""
    keys = jax.random.split(key, len(TAPS))
    return {k: jax.random.bernoulli(kk, 1.0 - prob, feats[k].shape[:3] + (1,)).astype(
        feats[k].dtype) for k, kk in zip(TAPS, keys)}


class MRKD(RD4AD):
    name = "mrkd"
    generation = True

    @classmethod
    def default_settings(cls):
        """``config.mrkd``: the published training's masks."""
        c = ml_collections.ConfigDict()
        c.ilm = True  # image-level masking: NSA patch swap of the student's input
        c.flm = True  # feature-level masking: random positions of each decoder output zeroed
        c.mask_prob = 0.2  # FLM: probability that a position is masked
        # The official code masks at test time too (random, a fresh mask per batch):
        # True reproduces that protocol (masks drawn from the eval seed); False (default)
        # evaluates without masks, deterministically.
        c.flm_at_test = False
        c.nsa_category = ""  # NSA settings of this MVTec AD category (default: data.category)
        return c

    @classmethod
    def check_settings(cls, settings, config):
        p = float(settings.mask_prob)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"mrkd.mask_prob={settings.mask_prob}: must be in [0, 1) (the "
                              "probability that a feature position is masked; paper: 0.2).")
        cat = str(settings.nsa_category)
        if cat and cat not in nsa.CATEGORY_PARAMS:
            raise ConfigError(f"mrkd.nsa_category={cat!r}: use an MVTec AD category "
                              f"({', '.join(nsa.CATEGORY_PARAMS)}) or '' (data.category's).")

    def __init__(self, config, kernels=None):
        super().__init__(config, kernels)
        m = self.settings
        self.ilm, self.flm = bool(m.ilm), bool(m.flm)
        self.mask_prob = float(m.mask_prob)
        self.flm_at_test = bool(m.flm_at_test)
        self.nsa_params = nsa.params_for(str(m.nsa_category) or str(config.data.category))

    def loss(self, params, state, frozen, images, rng, cached=None):
        k_nsa, k_flm = jax.random.split(rng)
        target = self.train_teacher_features(frozen, images, cached)
        if self.ilm:
            x_tilde = nsa.nsa_batch(k_nsa, images, self.nsa_params)
            feats = self.teacher_features(frozen, x_tilde)
        else:
            feats = target
        # decoder outputs have the teacher taps' shapes
        masks = flm_masks(k_flm, feats, self.mask_prob) if self.flm else None
        s, new_state = self.student_features(params, state, feats, train=True, flm_masks=masks)
        loss = losses.flat_cosine_loss([target[k] for k in TAPS], [s[k] for k in TAPS])
        return loss, (new_state, {"loss": loss})

    def notes(self):
        if self.flm_at_test:
            return [f"MRKD evaluated with the official code's test-time feature masking "
                    f"(mrkd.flm_at_test=True): a random mask (p={self.mask_prob}) per batch, "
                    f"drawn from seed {int(self.config.seed)} and the batch's pixels."]
        return ["MRKD evaluated without test-time feature masking (deterministic; the official "
                "code masks at test time too: mrkd.flm_at_test=True reproduces that)."]

    def test_mask_key(self, images):
        """The key of a batch's test-time masks: the eval seed (``config.seed``) folded
        with a checksum of the batch's pixels, so each batch draws its own mask (as the
        official code's random masking at test time) and a rerun draws the same ones."""
        bits = jax.lax.bitcast_convert_type(images.astype(jnp.float32), jnp.uint32)
        return jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), jnp.sum(bits))

    def maps(self, params, state, frozen, images):
        t = self.teacher_features(frozen, images)
        masks = None
        if self.flm_at_test:  # the official protocol: random masks at test time
            masks = flm_masks(self.test_mask_key(images), t, self.mask_prob)
        s, _ = self.student_features(params, state, t, train=False, flm_masks=masks)
        return {"map": rd_anomaly_map(t, s, images.shape[1:3],
                                      float(self.config.eval.gaussian_sigma))}
