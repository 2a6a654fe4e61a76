"""RD4AD: reverse distillation from a one-class embedding (Deng & Li, CVPR 2022).

Teacher: frozen ImageNet WRN50-2, taps layer1..layer3. Student: the trainable
OCBE bottleneck and the mirrored decoder (kdjax.models.rd.RDStudent), BatchNorm
in train mode during training. Loss: the flattened cosine loss summed over the
three scales. Map: per-pixel cosine distance at each scale, bilinear upsample
(align_corners=True) to the input size, SUM over scales, Gaussian sigma 4.
Image score: max of the map (the engine takes it).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax

from kdjax import losses, ops
from kdjax.methods.base import Method
from kdjax.models.torch_init import seed_of, torch_style_init

TAPS = ("layer1", "layer2", "layer3")


def rd_anomaly_map(teacher: Dict[str, jax.Array], student: Dict[str, jax.Array], size,
                   sigma: float = 4.0, taps=TAPS) -> jax.Array:
    """Sum over taps of the upsampled per-pixel cosine distance, Gaussian-filtered."""
    total = 0.0
    for k in taps:
        d = losses.cosine_distance_map(teacher[k], student[k])
        total = total + ops.resize_bilinear(d, size, align_corners=True)
    return ops.gaussian_blur(total, sigma)


class RD4AD(Method):
    name = "rd4ad"
    map_names = ("map",)
    generation = False  # MRKD's feature generation modules

    def __init__(self, config, kernels=None):
        from kdjax.models.resnet import make_resnet
        from kdjax.models.rd import RDStudent

        super().__init__(config, kernels)
        t = config.teacher
        self.teacher = make_resnet(str(t.arch), width_divisor=int(t.width_divisor),
                                   dtype=self.dtype, kernels=self.kernels)
        self.student = RDStudent(width_divisor=int(t.width_divisor), generation=self.generation,
                                 dtype=self.dtype, kernels=self.kernels)

    def teacher_shapes(self, image_shape) -> Dict[str, jax.ShapeDtypeStruct]:
        """The teacher taps' shapes for one image of ``image_shape`` (no compute)."""
        dummy = jax.ShapeDtypeStruct((1,) + tuple(image_shape[1:]), self.dtype)
        out = jax.eval_shape(lambda x: self.teacher.init_with_output(
            jax.random.PRNGKey(0), x)[0], dummy)
        return {k: jax.ShapeDtypeStruct(out[k].shape, out[k].dtype) for k in TAPS}

    def teacher_features(self, frozen, images) -> Dict[str, jax.Array]:
        feats = self.teacher.apply(frozen["teacher"], images.astype(self.dtype))
        return {k: jax.lax.stop_gradient(feats[k]) for k in TAPS}

    def student_features(self, params, state, feats, train: bool,
                         flm_masks: Optional[dict] = None):
        """Student outputs {tap: NHWC}; in training also the new state."""
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        kwargs = {} if flm_masks is None else {"flm_masks": flm_masks}
        if train:
            out, upd = self.student.apply(variables, feats, train=True, mutable=["batch_stats"],
                                          **kwargs)
            return out, {**state, "batch_stats": upd["batch_stats"]}
        return self.student.apply(variables, feats, train=False, **kwargs), state

    # --- Method contract --------------------------------------------------
    def init(self, rng, image_shape, teacher_variables):
        # Shapes only (no compute); the student is initialised on the host with the
        # reference code's scheme (kaiming_normal fan_out convs, torch defaults else).
        svars = torch_style_init(self.student, seed_of(rng), self.teacher_shapes(image_shape),
                                 train=False)
        return {"params": svars["params"], "state": {"batch_stats": svars["batch_stats"]},
                "frozen": self.frozen_variables(teacher_variables)}

    @classmethod
    def check_init_from(cls, path):
        import os

        from kdjax.errors import ConfigError

        if os.path.isdir(path):
            raise ConfigError(f"init_from={path!r} is a directory: {cls.name} imports one "
                              "checkpoint FILE of the reference code (torch.save of its "
                              "{'bn', 'decoder'} state dicts); leave init_from empty to train "
                              "from scratch.")

    def import_reference(self, variables, path):
        """A checkpoint of the reference RD4AD / MRKD code ({"bn", "decoder"} state dicts)."""
        from kdjax import weights

        ref = weights.load_reference_rd_checkpoint(
            path, width_divisor=int(self.config.teacher.width_divisor),
            generation=self.generation)
        return {**variables, "params": ref["params"],
                "state": {**variables["state"], "batch_stats": ref["batch_stats"]}}

    def teacher_cache(self, frozen, images):
        """The teacher taps of the clean image: RD4AD's input and target."""
        return self.teacher_features(frozen, images)

    def train_teacher_features(self, frozen, images, cached):
        """Teacher taps of the clean training batch: the engine's cached rows if given."""
        return self.teacher_features(frozen, images) if cached is None else cached

    def loss(self, params, state, frozen, images, rng, cached=None):
        t = self.train_teacher_features(frozen, images, cached)
        s, new_state = self.student_features(params, state, t, train=True)
        loss = losses.flat_cosine_loss([t[k] for k in TAPS], [s[k] for k in TAPS])
        return loss, (new_state, {"loss": loss})

    def maps(self, params, state, frozen, images):
        t = self.teacher_features(frozen, images)
        s, _ = self.student_features(params, state, t, train=False)
        return {"map": rd_anomaly_map(t, s, images.shape[1:3], float(self.config.eval.gaussian_sigma))}
