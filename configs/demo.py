"""Demo: train and evaluate CAD on kdjax's synthetic logical-anomaly dataset in minutes on a CPU.

    python -m kdjax.main --config=configs/demo.py --workdir=runs/demo

The dataset (MVTec LOCO layout) is generated into <workdir>/synthetic_data on
first use. The teacher is the ported ImageNet WRN50-2 when it is cached or
downloadable; otherwise a random teacher, announced in the log and in
results.json (get the real one with: python tools/port_weights.py --arch
wide_resnet50_2 --src auto).
"""

from kdjax.config import base_config


def get_config():
    c = base_config("cad")
    c.seed = 0
    c.data.dataset = "synthetic"
    c.data.root = ""  # -> <workdir>/synthetic_data
    c.data.category = "all"
    c.data.image_size = 64
    c.data.synthetic_size = 128
    c.data.synthetic_counts = (64, 16, 24, 24, 24)
    c.teacher.weights = "auto"
    c.teacher.fallback_random = True
    c.teacher.allow_random = True
    c.train.batch_size = 8
    c.train.steps = 120
    c.train.steps_per_call = 10
    c.train.log_every = 20
    c.train.checkpoint_every = 60
    c.train.learning_rate = 0.005
    c.eval.batch_size = 16
    c.eval.resolution = "input"
    c.eval.gaussian_sigma = 1.0  # sigma 4 is for 256x256 maps; 64x64 maps use 1
    return c
