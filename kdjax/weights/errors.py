"""The errors of :mod:`kdjax.weights` (all ValueError / FileNotFoundError subclasses)."""

from __future__ import annotations


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references a global that is not on the allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a (complete) PyTorch checkpoint."""


class WeightMismatchError(ValueError):
    """Checkpoint tensors do not fit the Flax module (missing key, wrong shape, extra key)."""


class WeightsUnavailableError(FileNotFoundError):
    """``auto`` weights are neither cached nor downloadable."""
