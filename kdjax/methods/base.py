"""The contract between a method and the one training engine (kdjax/train.py).

A method is data: it holds pure functions and no loops, no I/O, no devices.
The engine owns the optimizer loop, sharding, device-resident data, PRNG keys,
checkpoints, evaluation and the report.

Variables are split in three pytrees:
  params  trainable; optimized by optax and checkpointed.
  state   not optimized but part of the trained model and checkpointed:
          BatchNorm running statistics, feature-normalization statistics
          (EfficientAD's teacher mean/std), etc. ``loss`` returns its update.
  frozen  constants that are not checkpointed: the teacher's variables, and
          any constant arrays a loss needs (e.g. penalty images).

Images reach methods as float32 NHWC, ImageNet-normalized, at
``config.data.image_size``. Map components leave ``maps`` as (N, h, w)
float32 at the method's working resolution (the input size unless the
method says otherwise): the inference path (kdjax/inference.py) normalizes
and combines them there, then ``finish_maps`` brings the combined map to the
requested output size in one resize (EfficientAD pads its 56x56 map first,
as its reference does). Anything random inside
``loss`` (augmentation, masking) is drawn from the ``rng`` argument with
``jax.random``, on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import optax

from kdjax import ops

Pytree = Any


class Method:
    name = "base"
    # Names of the map components that ``maps`` returns. With more than one,
    # the engine normalizes each with quantiles of the validation maps
    # (0.1 * (m - q_a) / (q_b - q_a)) and sums them with config.eval weights.
    map_names: Tuple[str, ...] = ("map",)
    # Whether the engine must compute validation-quantile normalization even
    # for a single component (EfficientAD does).
    normalize_with_validation = False

    def __init__(self, config):
        self.config = config

    # --- construction -----------------------------------------------------
    def init(self, rng: jax.Array, image_shape: Tuple[int, int, int, int]) -> Dict[str, Pytree]:
        """Return {"params": ..., "state": ..., "frozen": ...} (see module doc).

        ``image_shape`` is (N, H, W, 3) of one example batch.
        """
        raise NotImplementedError

    def inference_init(self, image_shape: Tuple[int, int, int, int]) -> Pytree:
        """Build the modules ``maps`` needs and return the ``frozen`` variables
        (the teacher, reloaded from ``config.teacher.weights``) without
        initializing any trainable parameter: a saved model (kdjax.inference)
        brings its own ``params`` and ``state``."""
        raise NotImplementedError(f"{self.name} cannot be loaded for inference.")

    def import_reference(self, variables: Dict[str, Pytree], path: str) -> Dict[str, Pytree]:
        """``--config.init_from=path``: variables with the trained weights of a
        checkpoint written by the method's reference code (a ValueError where the
        method has none)."""
        from kdjax.errors import ConfigError

        raise ConfigError(f"config.init_from: {self.name} has no reference checkpoint format to "
                         "import; leave init_from empty.")

    def teacher_description(self) -> str:
        """What teacher weights were used, for logs and results.json."""
        return "none"

    def prepare(self, variables: Dict[str, Pytree],
                train_batches: Callable[[], Iterator[jax.Array]]) -> Pytree:
        """Hook run once before training; returns the (possibly updated) state.

        ``train_batches()`` yields normalized training images in batches (a
        fresh iterator each call), e.g. for EfficientAD's teacher channel
        statistics. Default: state unchanged.
        """
        return variables["state"]

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optax optimizer from config.train: Adam with the config's betas (the
        papers'), or plain SGD (``train.optimizer="sgd"``, for numerical checks)."""
        t = self.config.train
        if t.get("optimizer", "adam") == "sgd":
            return optax.sgd(t.learning_rate)
        return optax.adam(t.learning_rate, b1=t.get("b1", 0.9), b2=t.get("b2", 0.999))

    def learning_rates(self, step: int, total_steps: int) -> Dict[str, float]:
        """The learning rate(s) of :meth:`optimizer` at ``step``, as host floats (for the
        training log and TensorBoard; never read inside the jitted step)."""
        return {"learning_rate": float(self.config.train.learning_rate)}

    # --- training ---------------------------------------------------------
    def teacher_cache(self, frozen: Pytree, images: jax.Array) -> Optional[Pytree]:
        """What ``loss`` computes from the CLEAN training images with the frozen
        teacher alone (no parameter, no state, no randomness), per image: a
        pytree of arrays with the batch axis first, or None (nothing to cache).

        The engine may compute it once for the resident training set
        (``train.cache_teacher``) and pass each batch's rows to ``loss`` as
        ``cached``; the loss must then equal the one computed without it.
        Jittable; called under ``jax.eval_shape`` to learn the sizes."""
        return None

    def loss(self, params: Pytree, state: Pytree, frozen: Pytree, images: jax.Array,
             rng: jax.Array, cached: Optional[Pytree] = None
             ) -> Tuple[jax.Array, Tuple[Pytree, Dict[str, jax.Array]]]:
        """Scalar loss on a batch, with (new_state, {metric name: scalar}).

        ``cached``: this batch's rows of :meth:`teacher_cache`, or None (then
        the loss computes them)."""
        raise NotImplementedError

    # --- inference --------------------------------------------------------
    def maps(self, params: Pytree, state: Pytree, frozen: Pytree,
             images: jax.Array) -> Dict[str, jax.Array]:
        """Anomaly-map components {name: (N, h, w)}; (h, w) is the input size
        unless ``finish_maps`` says otherwise."""
        raise NotImplementedError

    def finish_maps(self, maps: jax.Array, size: Tuple[int, int]) -> jax.Array:
        """The combined (normalized, weighted) (N, h, w) map -> (N, *size), in one resize.

        Jittable. Default: bilinear (torch ``align_corners=False``, as the
        evaluators resize maps to the original image size); the identity when
        ``size`` is the map's own."""
        return ops.resize_bilinear(maps, tuple(size), align_corners=False)
