"""``--mode=predict`` on the files a user really has, and the README's kdjax-free loader of
``model.jax``, both as documented, on the conftest's tiny demo run."""

import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_predict_converts_odd_images_and_skips_unreadable_ones(demo_run, tiny_synthetic_root,
                                                               tmp_path):
    """Any size, grayscale, RGBA and 16-bit images are converted as in training (an RGBA
    copy of an RGB image scores as the RGB one); an unreadable file is named, skipped
    and counted, and the rows hold only the readable images."""
    wd, _ = demo_run
    src = os.path.join(tiny_synthetic_root, "tray", "test", "good", "000.png")
    rgb = np.asarray(Image.open(src).convert("RGB"))
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(rgb).save(inp / "a_rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(
        inp / "b_rgba.png")
    Image.fromarray(rgb).convert("L").save(inp / "c_gray.png")
    Image.fromarray((np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257)).save(
        inp / "d_gray16.png")
    Image.fromarray(rgb).resize((90, 50)).save(inp / "e_other_size.jpg")
    (inp / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "out"
    p = run_cli("--mode=predict", f"--workdir={wd}", f"--input={inp}", f"--output={out}")
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [os.path.basename(r["path"]) for r in rows] == [
        "a_rgb.png", "b_rgba.png", "c_gray.png", "d_gray16.png", "e_other_size.jpg"]
    score = {os.path.basename(r["path"]): float(r["score"]) for r in rows}
    assert all(np.isfinite(v) for v in score.values())
    assert score["b_rgba.png"] == score["a_rgb.png"]
    assert score["d_gray16.png"] == score["c_gray.png"]  # 16-bit reduced to 8 as in training
    err = p.stdout + p.stderr
    assert "f_broken.png" in err and "Traceback" not in err
    assert re.search(r"5 images scored.*1 skipped", err), err[-2000:]


def test_readme_model_jax_loader_runs_without_kdjax(demo_run, tmp_path):
    """The README's loader, as written (paths pointed at this run's export), runs with
    jax alone: kdjax is never imported."""
    wd, _ = demo_run
    run_cli("--mode=export", f"--workdir={wd}", f"--output={tmp_path / 'export'}")
    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme.split("Running `model.jax` needs jax alone, no kdjax:", 1)[1]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    assert "runs/demo/export/tray/model.jax" in code
    code = code.replace("runs/demo/export/tray/model.jax",
                        str(tmp_path / "export" / "tray" / "model.jax"))
    size = int(re.search(r"np.zeros\(\(4, (\d+), \d+, 3\)", code).group(1))
    code = code.replace(f"(4, {size}, {size}, 3)", "(4, 32, 32, 3)")  # the tiny demo's size
    code += ("\nimport sys\nassert 'kdjax' not in sys.modules, 'the loader imported kdjax'\n"
             "assert maps.shape == (4, 32, 32) and scores.shape == (4,)\n"
             "assert is_anomalous.dtype == bool\nprint('ok')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    shutil.rmtree(tmp_path / "export")
