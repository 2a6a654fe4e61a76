"""tools/accelerator_check.py at tiny size, as a user runs it (a subprocess): one method
(RD4AD, the cheapest to compile) trained and evaluated in float32 and bfloat16 on this
machine's devices, compared with the float32 portable-kernels reference.

On the CPU the float32 maps come from kdjax's CPU kernels, so the row also checks that
they give the portable path's maps; the bfloat16 numbers are measurements, only
checked to be there."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_at_tiny_size(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "tools/accelerator_check.py", "--methods", "rd4ad", "--image_size", "32",
           "--width_divisor", "16", "--steps", "1", "--images", "4", "--batch", "2",
           "--peak_n", "128", "--json", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| rd4ad |")]
    assert [line.split("|")[2].strip() for line in table] == ["float32", "bfloat16"], r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(row["method"], row["dtype"]) for row in rows] == [("rd4ad", "float32"),
                                                               ("rd4ad", "bfloat16")]
    for row in rows:
        assert row["image_size"] == 32 and row["kernels"] == "cpu"
        for k in ("train_images_per_s", "infer_images_per_s", "map_diff_median",
                  "map_diff_worst", "image_auroc_diff", "matmul_peak_flop_per_s"):
            assert math.isfinite(row[k]), (k, row)
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
        assert 0 <= row["map_diff_median"] <= row["map_diff_worst"]
    assert rows[0]["map_diff_worst"] < 1e-4  # CPU kernels vs portable kernels, float32
