"""The errors of :mod:`kdjax.weights` (all ValueError / FileNotFoundError subclasses)."""

from __future__ import annotations

from kdjax.errors import UserError


class UnsafeCheckpointError(UserError, ValueError):
    """The checkpoint's pickle references a global that is not on the allow-list."""


class CheckpointFormatError(UserError, ValueError):
    """The file is not a (complete) PyTorch checkpoint."""


class WeightMismatchError(UserError, ValueError):
    """Checkpoint tensors do not fit the Flax module (missing key, wrong shape, extra key)."""


class WeightsUnavailableError(UserError, FileNotFoundError):
    """``auto`` weights are neither cached nor downloadable."""
