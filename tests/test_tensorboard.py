"""TensorBoard summaries of a run (kdjax/monitor.py, kdjax/tensorboard.py), read back.

The shared tiny demo run (conftest ``demo_run``, ``python -m kdjax.main
--config=configs/demo.py``) writes ``<workdir>/tensorboard/<category>/`` and
``.../mean/``; the event files are read with TensorFlow alone
(``kdjax.tensorboard.read_scalars``) and, where the ``tensorboard`` package is
installed, with its EventAccumulator, as ``tensorboard --logdir`` reads them.
"""

import json
import os

import pytest


def test_training_and_evaluation_scalars_read_back(demo_run):
    from kdjax.tensorboard import read_scalars, read_tags

    wd, _ = demo_run
    results = json.load(open(os.path.join(wd, "results.json")))
    (cat,) = results["categories"]
    run = os.path.join(wd, "tensorboard", cat)
    scalars = read_scalars(run)
    rows = [json.loads(line) for line in open(os.path.join(wd, "train_metrics.jsonl"))]
    last = rows[-1]
    # Every loss term CAD reports, the speed and the learning rate, at the logged steps.
    for k in ("loss", "local_loss", "global_loss", "affinity_loss", "images_per_s"):
        assert [s for s, _ in scalars[f"train/{k}"]] == [r["step"] for r in rows], k
        assert scalars[f"train/{k}"][-1][1] == pytest.approx(last[k], rel=1e-5), k
    assert scalars["train/learning_rate"][-1][1] == pytest.approx(0.005)
    # The evaluation metrics at the model's step, equal to results.json.
    for k, v in results["categories"][cat].items():
        if v is None:
            assert f"eval/{k}" not in scalars
            continue
        assert scalars[f"eval/{k}"] == [(2, pytest.approx(v, rel=1e-5, abs=1e-6))], k
    mean = read_scalars(os.path.join(wd, "tensorboard", "mean"))
    assert mean["eval/image_auroc"][0][1] == pytest.approx(results["mean"]["image_auroc"],
                                                           rel=1e-5)
    tags = read_tags(run)
    assert tags["eval/roc"] == "images" and tags["eval/overlays"] == "images"

    try:
        from tensorboard.backend.event_processing.plugin_event_accumulator import (
            EventAccumulator)
    except ImportError:
        return
    ea = EventAccumulator(run)
    ea.Reload()
    assert {"train/loss", "eval/image_auroc", "eval/roc"} <= set(ea.Tags()["tensors"])
    assert ea.SummaryMetadata("train/loss").plugin_data.plugin_name == "scalars"
    assert ea.SummaryMetadata("eval/roc").plugin_data.plugin_name == "images"


def test_tensorboard_serves_the_run(demo_run):
    """README: ``tensorboard --logdir <workdir>``, as written (the server on 127.0.0.1,
    asked for its scalar tags over HTTP, then stopped)."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    exe = shutil.which("tensorboard")
    if exe is None:
        pytest.skip("the tensorboard package is not installed (pip install tensorboard)")
    wd, _ = demo_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--logdir", wd, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.time() + 120, None
        while time.time() < deadline and tags is None:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
            except OSError:
                assert proc.poll() is None, "tensorboard exited"
                time.sleep(1)
        # TensorBoard loads runs in the background: wait until it has read the event files.
        run = "tensorboard/tray"  # the runs are the folders below --logdir
        while time.time() < deadline and "eval/image_auroc" not in (tags or {}).get(run, {}):
            time.sleep(1)
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                tags = json.loads(r.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags",
                                    timeout=5) as r:
            images = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert tags is not None, "tensorboard did not answer"
    assert {"train/loss", "train/images_per_s", "eval/image_auroc"} <= set(tags[run])
    assert "eval/image_auroc" in tags["tensorboard/mean"]
    assert {"eval/roc", "eval/overlays"} <= set(images[run])
