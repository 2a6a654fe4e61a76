"""Distill an EfficientAD teacher PDN from WideResNet-101 features (the paper's pretraining).

    python tools/distill_pdn.py --images /path/to/imagenet/train --out pdn_small_distilled.npz \
        --size S --steps 60000

Then train with it: ``--config.teacher.weights=pdn_small_distilled.npz``.

Recipe, as the reference reproduction's ``pretraining.py`` (nelson1425/EfficientAD):

* target: WRN-101 (torchvision ImageNet weights; ``--extractor_weights auto`` or a
  .pth / ported .npz path) on the image resized to 512x512. layer2 (64x64x512)
  and layer3 (32x32x1024) each become 3x3 patch vectors (zero padding 1;
  channel-major, then kernel row, kernel column); layer3's are bilinearly
  upsampled (align_corners=False) to 64x64; each patch vector is average-pooled
  to 1024 values (torch ``adaptive_avg_pool1d``), the two are concatenated
  (layer2 first) and pooled to 384. All of that after the backbone is linear,
  so it is done here as two matrix products (the upsampling commutes with the
  channel pooling). Targets are normalized per channel with mean / std over
  ``--norm_images`` images (the reference: 10,000).
* student: a PDN (S or M) with ``padding=True`` (64x64x384 output at 256x256),
  on the same image resized to 256; RandomGrayscale(0.1) applied to both.
* loss mean((target - PDN)^2); Adam lr 1e-4, weight decay 1e-5 (torch's L2
  form), batch 16, 60,000 steps in the reference.

Images are read from ``--images`` (any folder tree of .jpg/.png/...), a random
batch per step, decoded on the host with PIL (simple, not fast). The output is
a ported .npz (kdjax.weights.save_ported) that ``kdjax.weights.load_teacher(
"pdn_small" | "pdn_medium", path)`` reads; padding changes no parameter, so the
PDN is used with ``padding=False`` afterwards, as in the reference.

A smoke run on random weights at tiny sizes (what the tests can afford):

    python tools/distill_pdn.py --images some_folder --out /tmp/pdn.npz --steps 2 --batch 2 \
        --extractor_weights random --width_divisor 16 --extractor_size 128 --pdn_size 64 \
        --norm_images 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".JPEG")


def adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
    """(length, out) matrix M with v @ M == torch adaptive_avg_pool1d(v, out)."""
    m = np.zeros((length, out), np.float32)
    for i in range(out):
        start = (i * length) // out
        end = -((-(i + 1) * length) // out)  # ceil
        m[start:end, i] = 1.0 / (end - start)
    return m


def projection_matrices(c2: int, c3: int, mid: int = 1024, out: int = 384):
    """(9*c2, out) and (9*c3, out): patch vector -> pooled to ``mid`` -> the
    concatenation [layer2, layer3] pooled to ``out`` (reference order)."""
    p_final = adaptive_pool_matrix(2 * mid, out)
    a2 = adaptive_pool_matrix(9 * c2, mid) @ p_final[:mid]
    a3 = adaptive_pool_matrix(9 * c3, mid) @ p_final[mid:]
    return a2, a3


def patches3x3(x):
    """NHWC -> (N, H, W, C*9): 3x3 neighbourhoods, zero padding 1, ordered
    channel-major then kernel row / column (torch.nn.Unfold's order)."""
    import jax.numpy as jnp

    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
    return jnp.stack(shifts, axis=-1).reshape(n, h, w, c * 9)


def make_embed(extractor, a2, a3):
    """Pure function (extractor variables, images at 512) -> (N, 64, 64, 384) targets."""
    import jax.numpy as jnp

    from kdjax import ops

    a2 = jnp.asarray(a2)
    a3 = jnp.asarray(a3)

    def embed(ext_vars, images):
        taps = extractor.apply(ext_vars, images)
        f2 = patches3x3(taps["layer2"].astype(jnp.float32)) @ a2
        f3 = patches3x3(taps["layer3"].astype(jnp.float32)) @ a3
        h, w = f2.shape[1:3]
        mh = jnp.asarray(ops.interp_matrix(f3.shape[1], h, False))
        mw = jnp.asarray(ops.interp_matrix(f3.shape[2], w, False))
        f3 = jnp.einsum("oh,nhwc,pw->nopc", mh, f3, mw)
        return f2 + f3

    return embed


class ImageSource:
    """Random batches of a folder's images: RandomGrayscale(p) then resized to the
    extractor's and the PDN's sizes (PIL bilinear), ImageNet-normalized float32 NHWC."""

    def __init__(self, folder: str, ext_size: int, pdn_size: int, gray_p: float, seed: int):
        if not os.path.isdir(folder):
            raise SystemExit(f"--images {folder!r} is not a directory: give a folder of natural "
                             "images (the paper uses the ImageNet training set).")
        files = []
        for root, _, names in os.walk(folder):
            files += [os.path.join(root, n) for n in names if n.endswith(_IMAGE_EXTS)
                      or n.lower().endswith(_IMAGE_EXTS)]
        if not files:
            raise SystemExit(f"No images found under {folder!r}.")
        self.files = sorted(files)
        self.ext_size, self.pdn_size, self.gray_p = ext_size, pdn_size, gray_p
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int):
        from PIL import Image

        from kdjax.data.types import IMAGENET_MEAN, IMAGENET_STD

        mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
        big, small = [], []
        for i in self.rng.integers(0, len(self.files), n):
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                if self.rng.random() < self.gray_p:
                    im = im.convert("L").convert("RGB")
                big.append(np.asarray(im.resize((self.ext_size,) * 2, Image.BILINEAR)))
                small.append(np.asarray(im.resize((self.pdn_size,) * 2, Image.BILINEAR)))
        norm = lambda a: ((np.stack(a).astype(np.float32) / 255.0 - mean) / std)
        return norm(big), norm(small)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of natural images (ImageNet train)")
    p.add_argument("--out", required=True, help="output .npz for teacher.weights")
    p.add_argument("--size", default="S", choices=["S", "M"])
    p.add_argument("--steps", type=int, default=60000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=1e-5)
    p.add_argument("--norm_images", type=int, default=10000,
                   help="images for the target's channel mean / std")
    p.add_argument("--extractor_weights", default="auto",
                   help="wide_resnet101_2 weights: auto | a .pth / ported .npz path | random")
    p.add_argument("--width_divisor", type=int, default=1, help="(random extractor only) tests")
    p.add_argument("--extractor_size", type=int, default=512)
    p.add_argument("--pdn_size", type=int, default=256)
    p.add_argument("--grayscale", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log_every", type=int, default=100)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    from kdjax import backends, weights
    from kdjax.models.pdn import PDN

    if args.width_divisor != 1 and args.extractor_weights != "random":
        raise SystemExit("--width_divisor != 1 needs --extractor_weights random (smoke tests).")
    kernels = backends.select()
    extractor, ext_vars = weights.load_teacher("wide_resnet101_2", args.extractor_weights,
                                               width_divisor=args.width_divisor, kernels=kernels)
    desc = weights.describe_source("wide_resnet101_2", args.extractor_weights, args.width_divisor)
    print(f"extractor: {desc}", flush=True)
    src = ImageSource(args.images, args.extractor_size, args.pdn_size, args.grayscale, args.seed)

    probe = jax.eval_shape(lambda v, x: extractor.apply(v, x), ext_vars,
                           jax.ShapeDtypeStruct((1, args.extractor_size, args.extractor_size, 3),
                                                jnp.float32))
    c2, c3 = probe["layer2"].shape[-1], probe["layer3"].shape[-1]
    a2, a3 = projection_matrices(c2, c3)
    embed_fn = make_embed(extractor, a2, a3)  # traced inside the training step
    embed = backends.jit(embed_fn)

    # Target channel statistics (two passes over the same images, as the reference).
    n_batches = max(1, math.ceil(args.norm_images / args.batch))
    state = src.rng.bit_generator.state
    total = None
    for _ in range(n_batches):
        t = np.asarray(embed(ext_vars, jnp.asarray(src.batch(args.batch)[0])), np.float64)
        s = t.mean(axis=(0, 1, 2))
        total = s if total is None else total + s
    mean = total / n_batches
    src.rng.bit_generator.state = state
    total = 0.0
    for _ in range(n_batches):
        t = np.asarray(embed(ext_vars, jnp.asarray(src.batch(args.batch)[0])), np.float64)
        total = total + ((t - mean) ** 2).mean(axis=(0, 1, 2))
    # Floor: a constant target channel (a dead ReLU path) would divide 0 by 0.
    std = np.maximum(np.sqrt(total / n_batches), 1e-8)
    mean_j, std_j = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    pdn = PDN(args.size, 384, padding=True, conv=kernels.pdn_conv_train)
    x0 = jnp.zeros((1, args.pdn_size, args.pdn_size, 3))
    params = pdn.init(jax.random.PRNGKey(args.seed), x0)["params"]
    out_hw = jax.eval_shape(lambda: pdn.apply({"params": params}, x0)).shape[1]
    tgt_hw = jax.eval_shape(embed, ext_vars, jnp.zeros(
        (1, args.extractor_size, args.extractor_size, 3))).shape[1]
    if out_hw != tgt_hw:
        raise SystemExit(f"PDN output {out_hw}x{out_hw} != target {tgt_hw}x{tgt_hw}: use "
                         "--pdn_size = --extractor_size / 2 (256 and 512 in the reference).")
    tx = optax.chain(optax.add_decayed_weights(args.weight_decay), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(args.lr))
    opt = tx.init(params)

    @backends.jit
    def step(params, opt, big, small):
        target = (embed_fn(ext_vars, big) - mean_j) / std_j

        def loss_fn(p):
            return jnp.mean((target - pdn.apply({"params": p}, small)) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    t0 = time.time()
    for i in range(args.steps):
        big, small = src.batch(args.batch)
        params, opt, loss = step(params, opt, jnp.asarray(big), jnp.asarray(small))
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            print(f"step {i + 1}/{args.steps} loss {float(loss):.5f} "
                  f"({(i + 1) / (time.time() - t0):.2f} steps/s)", flush=True)
    arch = "pdn_small" if args.size == "S" else "pdn_medium"
    meta = {"arch": arch, "source": f"distilled by tools/distill_pdn.py from {desc} on "
            f"{args.images}", "steps": args.steps, "batch": args.batch,
            "final_loss": float(loss)}
    weights.save_ported(args.out, {"params": jax.device_get(params)}, meta)
    print(json.dumps({"out": args.out, **meta}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
