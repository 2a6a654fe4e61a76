"""The contract between a method and the one training engine (kdjax/train.py).

A method is data: it holds its Flax modules and pure functions, and no loops,
no I/O, no devices. The engine owns the optimizer loop, sharding,
device-resident data, PRNG keys, the teacher's weights (kdjax/teacher.py),
checkpoints, evaluation and the report.

A method is built from the config and the kernels its modules compute with
(``Method(config, kernels)``; kdjax.backends, chosen once by the engine); it
builds every module it needs there. Its settings are ``config.<name>``
(:meth:`Method.default_settings`, checked by ``kdjax.config.validate``).

Variables are split in three pytrees:
  params  trainable; optimized by optax and checkpointed.
  state   not optimized but part of the trained model and checkpointed:
          BatchNorm running statistics, feature-normalization statistics
          (EfficientAD's teacher mean/std), etc. ``loss`` returns its update.
  frozen  constants that are not checkpointed: the teacher's variables (loaded
          by the engine and handed to :meth:`Method.init`), and any constant
          arrays the engine adds for a loss (EfficientAD's penalty images).

Images reach methods as float32 NHWC, ImageNet-normalized, at
``config.data.image_size``. Map components leave ``maps`` as (N, h, w)
float32 at the method's working resolution (the input size unless the
method says otherwise): the inference path (kdjax/inference.py) normalizes
and combines them there, then ``finish_maps`` brings the combined map to the
requested output size in one resize (EfficientAD pads its 56x56 map first,
as its reference does). Anything random inside
``loss`` (augmentation, masking) is drawn from the ``rng`` argument with
``jax.random``, on the device.

Statistics of the training set that the state holds (EfficientAD's teacher
channel mean and std) are computed by the engine: ``prepare_passes`` passes
over the resident training images, each averaging a jittable per-image
statistic (:meth:`Method.prepare_statistic`) over the set in float64 and
handing it back (:meth:`Method.prepare_update`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from kdjax import backends, ops

Pytree = Any


class Method:
    name = "base"
    # Whether the optimizer applies ``train.weight_decay`` (EfficientAD: torch Adam's L2
    # term); config validation refuses a non-zero weight decay for the others.
    applies_weight_decay = False
    # Keys of the method's settings section that older kdjax versions had and that are
    # dropped when a saved config holds them (a model artifact written before).
    removed_settings: Tuple[str, ...] = ()
    # Names of the map components that ``maps`` returns. With more than one,
    # the engine normalizes each with quantiles of the validation maps
    # (0.1 * (m - q_a) / (q_b - q_a)) and sums them with config.eval weights.
    map_names: Tuple[str, ...] = ("map",)
    # Whether the engine must compute validation-quantile normalization even
    # for a single component (EfficientAD does).
    normalize_with_validation = False

    # Passes of the engine over the training images before training (see
    # prepare_statistic); 0: the state needs no statistics of the training set.
    prepare_passes = 0

    def __init__(self, config, kernels: Optional[backends.Kernels] = None):
        self.config = config
        self.settings = self.resolve_settings(config)
        self.kernels = backends.select() if kernels is None else kernels
        # train.compute_dtype (validated: float32 | bfloat16; inference builds its method
        # with eval.compute_dtype there, kdjax.inference.inference_config).
        self.dtype = jnp.dtype(str(config.train.get("compute_dtype", "float32")))

    # --- settings ---------------------------------------------------------
    @classmethod
    def default_settings(cls):
        """Every key of the method's section of the config (``config.<name>``) with its
        default and meaning, as an ``ml_collections.ConfigDict``; empty when the method
        has no settings of its own."""
        import ml_collections

        return ml_collections.ConfigDict()

    @classmethod
    def check_settings(cls, settings, config) -> None:
        """Refuse settings that cannot run (:class:`kdjax.errors.ConfigError`, one line
        naming the key, the value and the fix); may normalize values in place."""

    @classmethod
    def resolve_settings(cls, config):
        """``config.<name>`` merged over :meth:`default_settings`, checked: the one way
        every method reads its settings (also called by ``kdjax.config.validate``, so a
        bad key or value is refused before any data is read). Unknown keys are refused
        with the closest known ones."""
        from kdjax import config as config_lib
        from kdjax.errors import ConfigError

        out = cls.default_settings()
        given = config.get(cls.name, None)
        if given is not None and not hasattr(given, "keys"):
            raise ConfigError(f"{cls.name}={given!r}: the method's settings are a section "
                              f"(--config.{cls.name}.<key>=<value>).")
        if given:
            given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
            for k in cls.removed_settings:
                given.pop(k, None)
            known = [f"{cls.name}.{k}" for k in out.keys()]
            unknown = sorted(k for k in given if k not in out)
            if unknown:
                if not known:
                    raise ConfigError(
                        f"config.{cls.name} sets {', '.join(unknown)}, but method "
                        f"{cls.name!r} has no settings of its own: remove that section.")
                raise ConfigError(config_lib.unknown_key_message(
                    f"{cls.name}.{unknown[0]}", known, " in the config") + ".")
            for k, v in given.items():
                default = out[k]
                if isinstance(default, tuple) and isinstance(v, list):
                    v = tuple(v)
                try:
                    out[k] = v
                except (TypeError, ValueError):
                    raise ConfigError(
                        f"{cls.name}.{k}={v!r}: must be {_kind(default)} like the default "
                        f"{default!r}.") from None
        cls.check_settings(out, config)
        return out

    # --- the teacher --------------------------------------------------------
    # ``teacher``: the frozen teacher's Flax module (built in __init__); the
    # engine loads its variables (kdjax/teacher.py) from ``teacher_source()``.
    teacher: Any = None

    @property
    def teacher_arch(self) -> str:
        """The teacher architecture whose weights the engine loads (kdjax.weights)."""
        return str(self.config.teacher.arch)

    @property
    def teacher_width_divisor(self) -> int:
        """The divisor of the teacher's widths (1: the published network)."""
        return int(self.config.teacher.width_divisor)

    def teacher_source(self) -> str:
        """Where the teacher's weights come from: ``teacher.weights`` (a file, "auto"
        or "random"); a method whose reference checkpoints hold their teacher
        (EfficientAD's ``init_from``) names that file."""
        return str(self.config.teacher.weights)

    # --- construction -----------------------------------------------------
    def init(self, rng: jax.Array, image_shape: Tuple[int, int, int, int],
             teacher_variables: Pytree) -> Dict[str, Pytree]:
        """Return {"params": ..., "state": ..., "frozen": ...} (see module doc):
        freshly initialized trainable parameters and state, and
        :meth:`frozen_variables` of the teacher's variables.

        ``image_shape`` is (N, H, W, 3) of one example batch."""
        raise NotImplementedError

    def frozen_variables(self, teacher_variables: Pytree) -> Pytree:
        """The ``frozen`` pytree ``loss`` and ``maps`` read, from the teacher's variables."""
        return {"teacher": teacher_variables}

    @classmethod
    def check_init_from(cls, path: str) -> None:
        """Refuse an ``init_from`` (an existing path) that :meth:`import_reference` cannot
        import: a ConfigError, one line, raised by ``kdjax.config.validate`` before any data
        is read. A method that does not override ``import_reference`` has no format."""
        if cls.import_reference is Method.import_reference:
            from kdjax.errors import ConfigError

            raise ConfigError(f"init_from={path!r}: method {cls.name!r} has no reference "
                              "checkpoint format to import; leave init_from empty.")

    def import_reference(self, variables: Dict[str, Pytree], path: str) -> Dict[str, Pytree]:
        """``--config.init_from=path``: variables with the trained weights of a
        checkpoint written by the method's reference code (a ConfigError where the
        method has none)."""
        from kdjax.errors import ConfigError

        raise ConfigError(f"config.init_from: {self.name} has no reference checkpoint format to "
                         "import; leave init_from empty.")

    def prepare_statistic(self, frozen: Pytree, state: Pytree, images: jax.Array) -> Pytree:
        """Per-image statistics (a pytree, batch axis first) of normalized ``images``
        given the state so far; the engine averages them over the training set in
        each of the ``prepare_passes`` passes (one compiled function serves all).
        Jittable."""
        raise NotImplementedError

    def prepare_update(self, index: int, state: Pytree, means: Pytree) -> Pytree:
        """The state after pass ``index``: ``means`` is the mean over the whole
        training set of :meth:`prepare_statistic` (host float64 arrays)."""
        raise NotImplementedError

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optax optimizer: Adam at ``train.learning_rate`` with the config's betas
        (the papers'). A method with another recipe (EfficientAD's schedule, CAD's
        parameter groups) overrides it."""
        return self.adam(float(self.config.train.learning_rate))

    def adam(self, learning_rate: float) -> optax.GradientTransformation:
        """Adam at ``learning_rate`` with ``train.b1`` / ``train.b2``."""
        t = self.config.train
        return optax.adam(learning_rate, b1=float(t.get("b1", 0.9)), b2=float(t.get("b2", 0.999)))

    def learning_rates(self, step: int, total_steps: int) -> Dict[str, float]:
        """The learning rate(s) of :meth:`optimizer` at ``step``, as host floats (for the
        training log and TensorBoard; never read inside the jitted step)."""
        return {"learning_rate": float(self.config.train.learning_rate)}

    # --- training ---------------------------------------------------------
    def training_images(self) -> Dict[str, Dict[str, Any]]:
        """Image sets besides the training images that ``loss`` reads from
        ``frozen`` (EfficientAD's penalty images): {name: keyword arguments of
        :func:`kdjax.data.penalty.load_penalty_images`}; the engine loads them and
        adds them to ``frozen`` for training only."""
        return {}

    def notes(self) -> list:
        """Lines for the report (results.json "notes", results.md) saying how this run
        differs from the published protocol, e.g. a switch of the evaluation."""
        return []

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


def _kind(value) -> str:
    """'a number', 'a string', ... for a setting's default value."""
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (tuple, list)):
        return "a tuple"
    return f"a {type(value).__name__}"
