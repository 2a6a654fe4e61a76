"""The measuring tools as documented (tiny settings: they must run, not measure here)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_benchmark_prints_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    p = _tool("tools/benchmark.py", "--config=configs/mvtec_rd4ad.py",
              "--config.train.batch_size=2", "--config.eval.batch_size=2",
              "--config.train.steps_per_call=1", "--config.data.image_size=32",
              "--config.teacher.width_divisor=16", "--steps=1", "--infer_batches=1",
              "--nopeak", f"--json={out}")
    res = json.load(open(out))
    for k in ("train_images_per_s", "infer_images_per_s", "device", "batch_size", "image_size",
              "kernels"):
        assert k in res and k in p.stdout
    assert res["train_images_per_s"] > 0 and res["kernels"] == "cpu"


def test_bench_pipeline_measures_the_stream(tmp_path):
    out = tmp_path / "pipe.json"
    p = _tool("tools/bench_pipeline.py", "--count=6", "--file-size=64", "--size=32",
              "--batch=4", f"--root={tmp_path / 'data'}", f"--json={out}")
    res = json.load(open(out))
    for k in ("png_images_per_s_1", "png_images_per_s_all", "cache_images_per_s_all"):
        assert res[k] > 0
    assert "stream from data.cache" in p.stdout
