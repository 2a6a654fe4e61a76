"""RD4AD (Deng & Li, CVPR 2022) on VisA (Zou et al., ECCV 2022), with RD4AD's published settings.

    python -m kdjax.main --config=configs/visa_rd4ad.py --workdir=runs/visa_rd4ad \
        --config.data.root=/path/to/VisA_20220922 [--config.data.category=candle]

The root is the extracted VisA archive as distributed (split_csv/1cls.csv and the
category folders; https://github.com/amazon-science/spot-diff): kdjax reads the official
one-class split from 1cls.csv, no reorganisation needed (docs/DATA.md, "VisA").
Everything else is configs/mvtec_rd4ad.py's recipe: WRN50-2 teacher, OCBE + mirrored
decoder, flattened cosine loss, Adam lr 0.005 betas (0.5, 0.999), batch 16, 200 epochs,
seed 111, 256x256 inputs made by stretching the non-square images (as RD4AD's
``transforms.Resize((256, 256))`` does; --config.data.resize=pad or center_crop keeps the
aspect ratio), metrics at 256x256, every training image trained on.

No targets: RD4AD's authors published no VisA numbers, and the third-party
reproductions differ in protocol, so none is shown beside ours.
"""

from kdjax.config import base_config


def get_config():
    c = base_config()
    c.method = "rd4ad"
    c.seed = 111
    c.data.dataset = "visa"
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
    # As RD4AD's reference: no training image is held out. The decision threshold is then a
    # quantile of the training images' own scores (optimistic; said in model.json and
    # results.md); --config.data.validation_fraction=0.1 holds 10% out.
    c.data.validation_fraction = 0.0
    return c
