"""tools/distill_pdn.py: its linear algebra against direct formulas, and a smoke
run on a folder of images with a random, reduced-width extractor whose output
loads as an EfficientAD teacher."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import distill_pdn  # noqa: E402


def _torch_adaptive_avg_pool1d(v, out):
    """torch's definition: bin i averages v[floor(i L / out) : ceil((i + 1) L / out)]."""
    n = v.shape[-1]
    return np.stack([v[..., (i * n) // out: -((-(i + 1) * n) // out)].mean(-1)
                     for i in range(out)], -1)


@pytest.mark.parametrize("length,out", [(10, 4), (4608, 1024), (2048, 384), (7, 7)])
def test_adaptive_pool_matrix(length, out):
    v = np.random.default_rng(0).normal(size=(3, length)).astype(np.float32)
    np.testing.assert_allclose(v @ distill_pdn.adaptive_pool_matrix(length, out),
                               _torch_adaptive_avg_pool1d(v, out), rtol=1e-5, atol=1e-6)


def test_patches_and_projection_match_the_reference_order():
    """torch.nn.Unfold(3, padding=1) order (channel, kernel row, kernel column),
    pooled to 1024 per layer, concatenated and pooled to 384 == patches @ a."""
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    c2, c3, h = 4, 6, 5
    x2 = rng.normal(size=(1, h, h, c2)).astype(np.float32)
    x3 = rng.normal(size=(1, h, h, c3)).astype(np.float32)
    got2 = np.asarray(distill_pdn.patches3x3(jnp.asarray(x2)))
    xp = np.pad(x2, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.stack([xp[0, 3 + di, 4 + dj, c] for c in range(c2) for di in (-1, 0, 1)
                     for dj in (-1, 0, 1)])
    np.testing.assert_allclose(got2[0, 2, 3], want)
    a2, a3 = distill_pdn.projection_matrices(c2, c3, mid=16, out=8)
    p3 = np.asarray(distill_pdn.patches3x3(jnp.asarray(x3)))
    ref = _torch_adaptive_avg_pool1d(np.concatenate(
        [_torch_adaptive_avg_pool1d(got2, 16), _torch_adaptive_avg_pool1d(p3, 16)], -1), 8)
    np.testing.assert_allclose(got2 @ a2 + p3 @ a3, ref, rtol=1e-5, atol=1e-5)


def test_smoke_run_writes_a_loadable_teacher(tmp_path, capsys):
    from kdjax import weights

    folder = tmp_path / "natural"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), np.uint8)).save(
            folder / "sub" / f"{i}.png")
    out = tmp_path / "pdn.npz"
    distill_pdn.main(["--images", str(folder), "--out", str(out), "--steps", "2", "--batch", "2",
                      "--extractor_weights", "random", "--width_divisor", "16",
                      "--extractor_size", "128", "--pdn_size", "64", "--norm_images", "2",
                      "--log_every", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("step 1/2 loss") and lines[-2].startswith("step 2/2 loss")
    meta = json.loads(lines[-1])
    assert meta["arch"] == "pdn_small" and np.isfinite(meta["final_loss"])
    module, variables = weights.load_teacher("pdn_small", str(out))
    leaves = [np.asarray(a) for a in __import__("jax").tree_util.tree_leaves(variables)]
    assert leaves and all(np.all(np.isfinite(a)) for a in leaves)


def test_missing_folder_says_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="folder of natural"):
        distill_pdn.ImageSource(str(tmp_path / "nope"), 128, 64, 0.1, 0)
