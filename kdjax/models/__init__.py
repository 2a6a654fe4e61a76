"""Flax modules: teachers (resnet.py, pdn.py) and students (rd.py, ...).

Import the submodules directly, e.g. ``from kdjax.models.resnet import make_resnet``.
"""
