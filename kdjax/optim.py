"""Optimizers of the methods' recipes beyond plain Adam."""

from __future__ import annotations

import optax


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
