"""kdjax: unsupervised industrial anomaly detection by knowledge distillation in JAX/Flax.

Methods: CAD (contextual affinity distillation), the DFSC margin on EfficientAD,
MRKD (masked reverse distillation), and their baselines RD4AD and EfficientAD.
"""

__version__ = "0.1.0"
