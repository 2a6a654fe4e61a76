"""RD4AD (Deng & Li, CVPR 2022) on MVTec AD 2 (Heckler-Kram et al., 2025), with RD4AD's
published settings.

    python -m kdjax.main --config=configs/mvtec_ad2_rd4ad.py --workdir=runs/mvtec_ad2_rd4ad \
        --config.data.root=/path/to/mvtec_ad_2 [--config.data.category=can]

Trains on train/good; the validation/good split chooses the decision threshold; the
metrics are those of test_public (its ground truth), at 256x256. The maps of
test_private and test_private_mixed, which have no ground truth, are written at each
image's original size for the evaluation server (https://benchmark.mvtec.com):
<workdir>/submission/anomaly_images/<category>/<split>/<stem>.tiff (float16) and
anomaly_images_thresholded/.../<stem>.png (the decision threshold; kdjax/submission.py).
The server takes all eight categories (the default, data.category=all).

The recipe is configs/mvtec_rd4ad.py's: WRN50-2 teacher, OCBE + mirrored decoder,
flattened cosine loss, Adam lr 0.005 betas (0.5, 0.999), batch 16, 200 epochs, seed 111,
256x256 inputs made by stretching the non-square images (RD4AD's
``transforms.Resize((256, 256))``; --config.data.resize=pad or center_crop keeps the aspect
ratio). 256 px is RD4AD's resolution, not MVTec AD 2's: its small defects need more
(--config.data.image_size=512 or more, at a higher cost).

No targets: no RD4AD numbers on MVTec AD 2 at these settings are cited here.
"""

from kdjax.config import base_config


def get_config():
    c = base_config()
    c.method = "rd4ad"
    c.seed = 111
    c.data.dataset = "mvtec_ad2"
    c.data.category = "all"
    c.data.image_size = 256
    c.data.resize = "stretch"
    c.teacher.arch = "wide_resnet50_2"
    c.teacher.weights = "auto"
    c.train.batch_size = 16
    c.train.epochs = 200
    c.train.learning_rate = 0.005
    c.train.b1, c.train.b2 = 0.5, 0.999
    c.eval.resolution = "input"
    return c
