"""CAD / DSKD (Zhang, Suganuma, Okatani, WACV 2024) on MVTec LOCO AD.

    python -m kdjax.main --config=configs/loco_cad.py --workdir=runs/loco_cad \
        --config.data.root=/path/to/mvtec_loco_anomaly_detection

Ablation (the paper's local-only / global-only / both, and training without
the contextual affinity loss):

    python -m kdjax.main --config=configs/loco_cad.py:ablation --workdir=runs/loco_cad_ablation \
        --config.data.root=/path/to/mvtec_loco_anomaly_detection

The headline run trains ONE model per category. With ``:ablation`` the map
weights local-only / global-only / both are evaluated from that same model
(``eval.weight_variants``; results.json "variants": "both", "both/local_only",
"both/global_only"), and one more model per category is trained with
``cad.affinity_weight=0`` ("both_no_affinity", with the same map-weight
variants; ``config.variants``).

The paper's code is not public; kdjax's reconstruction (local RD4AD student,
GCCB + global student, contextual affinity loss and map) and each of its
choices (``config.cad``) are documented in kdjax/methods/cad.py. Training
settings follow RD4AD (Adam lr 0.005, betas (0.5, 0.999), batch 16, 200
epochs, seed 111, 256x256); maps are evaluated at LOCO's original resolution
as the official evaluation does.
"""

import ml_collections

from kdjax.config import base_config


def get_config(arg=None):
    c = base_config("cad")
    c.seed = 111
    c.data.dataset = "mvtec_loco"
    c.data.category = "all"
    c.data.image_size = 256
    c.teacher.arch = "wide_resnet50_2"
    c.teacher.weights = "auto"
    c.train.batch_size = 16
    c.train.epochs = 200
    c.train.learning_rate = 0.005
    c.train.b1, c.train.b2 = 0.5, 0.999
    c.eval.resolution = "original"
    c.eval.gaussian_sigma = 4.0
    c.eval.map_weights = ml_collections.ConfigDict({"local": 1.0, "global": 1.0})
    c.eval.quantiles = (0.9, 0.995)
    # Published means (percent; MVTec LOCO AD, mean over the 5 categories). A plain dict
    # inside (convert_dict=False): ConfigDict field names cannot hold the dot of "au_spro_0.05".
    c.targets = ml_collections.ConfigDict(convert_dict=False)
    c.targets.mean = {"logical_auroc": 81.2, "structural_auroc": 86.9,
                          "image_auroc": 84.0, "au_spro_0.05": 73.0}
    c.targets_source = ("Zhang, Suganuma & Okatani, 'Contextual Affinity Distillation for Image "
                        "Anomaly Detection', WACV 2024 (arXiv 2307.03101), MVTec LOCO AD means")

    # Off by default: the headline run is one model. ":ablation" switches it on.
    c.ablation = arg == "ablation"
    if arg not in (None, "", "ablation"):
        raise ValueError(f"configs/loco_cad.py takes no argument or ':ablation', not {arg!r}.")
    # Map-weight variants: evaluated from the one trained model.
    c.eval.weight_variants = ml_collections.ConfigDict()
    # Training variants: {name: {"dotted.config.key": value}}, each trained in its own run.
    # convert_dict=False keeps the dotted-key dicts plain dicts (ConfigDict rejects dots).
    c.variants = ml_collections.ConfigDict(convert_dict=False)
    if c.ablation:
        c.eval.weight_variants = ml_collections.ConfigDict({
            "local_only": {"local": 1.0, "global": 0.0},
            "global_only": {"local": 0.0, "global": 1.0},
        })
        # "both" is the default map weights (local 1, global 1) of the headline model.
        c.variants.both = {}
        c.variants.both_no_affinity = {"cad.affinity_weight": 0.0}
    return c
