"""EfficientAD-S (Batzner et al., WACV 2024) on MVTec LOCO AD, all five categories.

    python -m kdjax.main --config=configs/loco_efficientad.py --workdir=runs/loco_efficientad \
        --config.data.root=/path/to/mvtec_loco_anomaly_detection

EfficientAD-M:

    python -m kdjax.main --config=configs/loco_efficientad.py --workdir=runs/loco_efficientad_m \
        --config.data.root=/path/to/mvtec_loco_anomaly_detection \
        --config.efficientad.model_size=M --config.teacher.arch=pdn_medium

The teacher is the PDN published with the reference reproduction
(nelson1425/EfficientAD, models/teacher_small.pth / teacher_medium.pth).
``teacher.weights=auto`` reads the ported file
$KDJAX_CACHE/teacher_small.kdjax.npz (default cache ~/.cache/kdjax), or ports
teacher_small.pth found in that cache on first use; the PDN teachers are not
downloaded automatically: fetch the .pth, then
``python tools/port_weights.py --arch pdn_small --src teacher_small.pth --out
~/.cache/kdjax/teacher_small.kdjax.npz`` (or pass any .pth / .npz path as
``--config.teacher.weights``). A teacher distilled by tools/distill_pdn.py
works the same way. The ImageNet penalty is off unless
``--config.efficientad.penalty_dir=/path/to/imagenet/train`` is given (as the
reference with ``--imagenet_train_path none``).

Recipe (docs/METHODS.md "EfficientAD"): batch 1, 70,000 steps, Adam lr 1e-4 with
weight decay 1e-5 (torch's L2 form), LR x0.1 after 95% of the steps, 256x256
inputs; maps normalized with the 0.9 / 0.995 quantiles of the validation maps
and combined 0.5 / 0.5; evaluated at LOCO's original resolution.
"""

import ml_collections

from kdjax.config import base_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"configs/loco_efficientad.py takes no argument, not {arg!r}.")
    c = base_config("efficientad")
    c.seed = 42  # the reference's seed
    c.data.dataset = "mvtec_loco"
    c.data.category = "all"
    c.data.image_size = 256
    c.teacher.arch = "pdn_small"  # pdn_medium with efficientad.model_size=M
    c.teacher.weights = "auto"
    c.train.batch_size = 1
    c.train.steps = 70000
    c.train.learning_rate = 1e-4
    c.train.b1, c.train.b2 = 0.9, 0.999
    c.train.weight_decay = 1e-5
    # Batch-1 steps are short: many per host call keeps the device busy.
    c.train.steps_per_call = 200
    c.train.checkpoint_every = 5000
    c.train.log_every = 1000
    c.efficientad.model_size = "S"
    c.efficientad.margin_weight = 0.0  # plain EfficientAD (see configs/loco_margin.py)
    c.eval.batch_size = 8
    c.eval.resolution = "original"
    c.eval.gaussian_sigma = 0.0  # EfficientAD's maps are not blurred (unused by this method)
    c.eval.quantiles = (0.9, 0.995)
    c.eval.map_weights = ml_collections.ConfigDict({"local": 0.5, "global": 0.5})
    # Published mean image AUROC (percent) on MVTec LOCO AD: EfficientAD-S 90.0, -M 90.7.
    c.targets = ml_collections.ConfigDict(convert_dict=False)
    c.targets.mean = {"image_auroc": 90.0}
    c.targets_source = ("Batzner, Heckler & Koenig, 'EfficientAD: Accurate Visual Anomaly "
                        "Detection at Millisecond-Level Latencies', WACV 2024: MVTec LOCO AD "
                        "mean image AUROC, EfficientAD-S 90.0 (-M 90.7)")
    return c
