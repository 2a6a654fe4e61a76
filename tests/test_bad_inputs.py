"""Bad inputs give one line, "kdjax: <message>", exit status 2, and no traceback; they are
found before any data is read (config errors) or before any training step (the dataset,
the workdir, the teacher's weights, a workdir in use).

One table, every row through ``kdjax.main`` as ``python -m kdjax.main <arguments>
--workdir=<tmp>`` runs it, in this process (:func:`run_main`: absl parses ``sys.argv``
with kdjax.main's own parser, then ``kdjax.main.main``; a subprocess per row would cost
2-4 s). Each row is (arguments, exit status, substrings of the message). Where the
command gets past the up-front checks, ``kdjax.experiment.train_and_evaluate`` (the
work) is replaced by a stub that records the call: a row with exit status 0 is accepted
and would start work; an error row must stop before the stub is reached (nothing read
or generated, no training step). Rows marked "@run" run the real work instead, for what
is found while the run loads its data or teacher (still before any training step).
:func:`test_the_in_process_runner_matches_the_command_line` runs some rows as a
subprocess too and compares.

Argument placeholders: {mvtec} the conftest's mini MVTec AD root (bottle, grid);
{partial} a root with bottle and an empty cable category; {visa} the mini VisA root
(candle, pcb1); {nocsv} a VisA root without split_csv/; {wd} the workdir; {file} an
existing file; {unwritable} a directory that cannot be written; {golden} tests/golden;
{tmp} the test's temporary directory.
Tokens: "@mvtec" / "@bad:<damage>" the --config flags of an rd4ad run on bottle of
{mvtec} / of a fresh tiny MVTec AD root with that damage (:func:`_damage`); "@loco:..."
and "@folder:..." likewise; "@file:<key>=<value>" a config file (configs/demo.py plus
that assignment, as a config file may write it) as --config; "@config.json" /
"@emptydir" make the workdir with a config.json / empty; "@lock" the workdir locked by a
live process; "@run" the real work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import traceback

import pytest
from PIL import Image

from kdjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
MVTEC = ["--config=configs/demo.py", "--config.data.dataset=mvtec_ad",
         "--config.data.category=bottle", "--config.method=rd4ad",
         "--config.teacher.weights=random"]


def rows(*args):
    return list(args)


ROWS = [
    # --- command line: flags, config file, config keys --------------------------------
    pytest.param(rows("--config=configs/nope.py"), 2,
                 ["No config file 'configs/nope.py'", "demo.py"], id="config-file-missing"),
    pytest.param(rows("--config=configs/dmo.py"), 2,
                 ["Did you mean configs/demo.py"], id="config-file-typo"),
    pytest.param(rows("--config=configs/demo.py", "--config.train.stepz=3"), 2,
                 ["unknown config key 'train.stepz'", "closest known keys: train.steps"],
                 id="override-unknown-key"),
    pytest.param(rows("--config=configs/demo.py", "--config.train.lr=1e30"), 2,
                 ["unknown config key 'train.lr'", "train.learning_rate"],
                 id="override-abbreviated-key"),
    pytest.param(rows("--config=configs/demo.py", "--config.train.steps=abc"), 2,
                 ["--config.train.steps=abc", "int"], id="override-bad-type"),
    pytest.param(rows("--config=configs/loco_cad.py:nonsense"), 2,
                 ["takes no argument or ':ablation'", "get_config"],
                 id="config-file-raises"),
    pytest.param(rows("--config=configs/demo.py", "--mode=bogus"), 2,
                 ["--mode=bogus", "predict"], id="bad-mode"),
    pytest.param(rows("--mode=train"), 2, ["--mode=train needs --config"], id="no-config"),
    pytest.param(rows("--config=configs/demo.py", "--input=x.png"), 2,
                 ["--input is only used with --mode=predict"], id="predict-flag-in-train"),
    pytest.param(rows("--config=configs/demo.py"), 0, [], id="demo-accepted"),
    # --- config values (config.validate, before any data is read) -----------------------
    pytest.param(rows("@mvtec", "--config.train.optimizer=lion"), 2,
                 ["train.optimizer='lion'", "optimizer=adam"], id="optimizer"),
    pytest.param(rows("@mvtec", "--config.train.weight_decay=1e-4"), 2,
                 ["train.weight_decay=0.0001", "'rd4ad'", "efficientad", "weight_decay=0"],
                 id="weight-decay-not-efficientad"),
    pytest.param(rows("@mvtec", "--config.train.steps=-1"), 2, ["train.steps=-1", ">= 0"],
                 id="steps-negative"),
    pytest.param(rows("@mvtec", "--config.train.steps=0", "--config.train.epochs=0"), 2,
                 ["train.steps=0 and train.epochs=0", "nothing to train"], id="no-steps"),
    pytest.param(rows("@mvtec", "--config.train.batch_size=0"), 2,
                 ["train.batch_size=0", ">= 1"], id="train-batch"),
    pytest.param(rows("@mvtec", "--config.eval.batch_size=0"), 2,
                 ["eval.batch_size=0", ">= 1"], id="eval-batch"),
    pytest.param(rows("@mvtec", "--config.train.learning_rate=nan"), 2,
                 ["train.learning_rate=nan", "finite"], id="lr-nan"),
    pytest.param(rows("@mvtec", "--config.train.learning_rate=inf"), 2,
                 ["train.learning_rate=inf"], id="lr-inf"),
    pytest.param(rows("@mvtec", "--config.train.learning_rate=-0.1"), 2,
                 ["train.learning_rate=-0.1", "> 0"], id="lr-negative"),
    pytest.param(rows("@mvtec", "--config.train.learning_rate=1e30"), 0, [],
                 id="lr-huge-is-allowed"),
    pytest.param(rows("@mvtec", "--config.train.steps_per_call=0"), 2,
                 ["train.steps_per_call=0"], id="steps-per-call"),
    pytest.param(rows("@mvtec", "--config.train.checkpoint_every=0"), 2,
                 ["train.checkpoint_every=0"], id="checkpoint-every"),
    pytest.param(rows("@mvtec", "--config.eval.threshold=best"), 2,
                 ["eval.threshold='best'", "'auto'", "'f1_val'", "'quantile'", "a number"],
                 id="threshold-word"),
    pytest.param(rows("@mvtec", "--config.eval.threshold=nan"), 2,
                 ["eval.threshold='nan'", "finite"], id="threshold-nan"),
    pytest.param(rows("@mvtec", "--config.eval.threshold=0.5"), 0, [], id="threshold-number"),
    pytest.param(rows("@mvtec", "--config.eval.threshold_quantile=1.0"), 2,
                 ["eval.threshold_quantile=1.0", "(0, 1)"], id="threshold-quantile"),
    pytest.param(rows("@mvtec", "--config.data.validation_fraction=1.0"), 2,
                 ["data.validation_fraction=1.0", "[0, 1)"], id="validation-fraction"),
    pytest.param(rows("@mvtec", "--config.data.validation_fraction=0.0"), 0, [],
                 id="validation-fraction-0"),
    pytest.param(rows("@mvtec", "--config.data.val_fraction=0.3",
                      "--config.data.validation_fraction=0.2"), 2,
                 ["deprecated", "data.validation_fraction"], id="val-fraction-conflict"),
    pytest.param(rows("@mvtec", "--config.eval.compute_dtype=float16"), 2,
                 ["eval.compute_dtype='float16'", "bfloat16"], id="eval-dtype"),
    pytest.param(rows("@mvtec", "--config.report.thumbnail_size=8"), 2,
                 ["report.thumbnail_size=8", "between 16 and 1024"], id="report-thumbnail"),
    pytest.param(rows("@mvtec", "--config.report.tensorboard_images=-1"), 2,
                 ["report.tensorboard_images=-1", ">= 0"], id="report-tensorboard-images"),
    pytest.param(rows("@mvtec", "--config.eval.quantiles=(0.995, 0.9)"), 2,
                 ["eval.quantiles=(0.995, 0.9)", "two increasing values"], id="quantiles"),
    pytest.param(rows("@mvtec", "--config.teacher.weights={mvtec}"), 2,
                 ["is a directory", ".pth or .npz FILE"], id="weights-directory"),
    pytest.param(rows("@mvtec", "--config.teacher.weights={mvtec}/nope.pth"), 2,
                 ["nope.pth", "no such file"], id="weights-missing"),
    pytest.param(rows("@file:train.stepz=3"), 2,
                 ["unknown config key 'train.stepz'", "train.steps", "config file"],
                 id="config-file-unknown-key"),
    pytest.param(rows("@file:ablation=True"), 0, [], id="top-level-plain-value-allowed"),
    pytest.param(rows("@file:modle={'x': 1}"), 2, ["unknown config key 'modle'"],
                 id="top-level-unknown-section"),
    # --- method sections, map weights, init_from (before any data is read or generated) --
    pytest.param(rows("--config=configs/demo.py", "--config.cad.affinity_distance=l3"), 2,
                 ["cad.affinity_distance='l3'", "'l1' or 'l2'"], id="cad-affinity-distance"),
    pytest.param(rows("--config=configs/loco_efficientad.py",
                      "--config.efficientad.margin_target=x"), 2,
                 ["efficientad.margin_target='x'", "student, autoencoder"],
                 id="efficientad-margin-target"),
    pytest.param(rows("--config=configs/mvtec_mrkd.py", "--config.mrkd.mask_prob=2"), 2,
                 ["mrkd.mask_prob=2.0", "[0, 1)"], id="mrkd-mask-prob"),
    pytest.param(rows("--config=configs/demo.py",
                      "--config.eval.map_weights={'local': 0, 'global': 0.0}"), 2,
                 ["eval.map_weights sets every map weight to 0", "local, global", "> 0"],
                 id="map-weights-all-zero"),
    pytest.param(rows("--config=configs/demo.py", "--config.eval.map_weights={'locl': 1}"), 2,
                 ["eval.map_weights names 'locl'", "local, global"], id="map-weights-unknown"),
    pytest.param(rows("--config=configs/loco_efficientad.py", "--config.init_from={tmp}"), 2,
                 ["init_from=", "has no teacher.pth, student.pth, autoencoder.pth"],
                 id="efficientad-init-from-without-teacher"),
    pytest.param(rows("--config=configs/demo.py", "--config.init_from={file}"), 2,
                 ["CAD has no public reference code", "leave init_from empty"],
                 id="cad-init-from"),
    # --- datasets: categories and layout (config.validate: directory listings) ----------
    pytest.param(rows("@mvtec", "--config.data.category=all"), 2,
                 ["data.category='all'", "13 of 15", "capsule", "{mvtec}",
                  "--config.data.category=bottle,grid"], id="category-all-partial"),
    pytest.param(rows("@mvtec", "--config.data.category=bottle,cable",
                      "--config.data.root={partial}"), 2,
                 ["cable", "has no training images", "--config.data.category=bottle"],
                 id="category-empty"),
    pytest.param(rows("@mvtec", "--config.data.category=bottle,grid"), 0, [],
                 id="category-list-present"),
    pytest.param(rows("@mvtec", "--config.data.category=botle"), 2,
                 ["'botle'", "Did you mean 'bottle'"], id="category-typo"),
    pytest.param(rows("@mvtec", "--config.data.root={mvtec}/bottle"), 2,
                 ["itself a category folder"], id="root-one-level-too-deep"),
    pytest.param(rows("@folder:no-category", "--config.data.category=all"), 2,
                 ["data.category=all", "no category folder with a train/ folder",
                  "it holds: widgets"], id="folder-all-without-category"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visaa"), 2,
                 ["Unknown dataset 'visaa'", "Did you mean 'visa'", "mvtec_ad2"],
                 id="dataset-typo"),
    pytest.param(rows("@mvtec", "--config.data.resize=squash"), 2,
                 ["data.resize='squash'", "'stretch'", "'pad'", "'center_crop'"], id="resize"),
    pytest.param(rows("@mvtec", "--config.data.image_filter=area"), 2,
                 ["data.image_filter='area'", "'lanczos'"], id="image-filter"),
    pytest.param(rows("@mvtec", "--config.data.mask_resize=bicubic"), 2,
                 ["data.mask_resize='bicubic'", "'nearest'"], id="mask-resize"),
    pytest.param(rows("@mvtec", "--config.data.source=hdf5"), 2,
                 ["data.source='hdf5'", "'tfds'"], id="source"),
    pytest.param(rows("@mvtec", "--config.data.dataset=btad", "--config.data.category=01",
                      "--config.data.source=tfds"), 2,
                 ["'btad' has no TFDS builder", "--config.data.source=files"],
                 id="source-tfds-without-builder"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa", "--config.data.category=candel"),
                 2, ["Unknown visa category 'candel'", "Did you mean 'candle'"],
                 id="visa-category-typo"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa", "--config.data.category=candle",
                      "--config.data.root={nocsv}"), 2,
                 ["split_csv/1cls.csv", "https://github.com/amazon-science/spot-diff"],
                 id="visa-root-without-split-csv"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa", "--config.data.category=candle",
                      "--config.data.root={wd}/nope"), 2,
                 ["data.root '{wd}/nope' does not exist", "VisA",
                  "https://github.com/amazon-science/spot-diff"], id="visa-root-missing"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa",
                      "--config.data.category=candle,pcb2", "--config.data.root={visa}"), 2,
                 ["1 of 2 categories is not in data.root", "pcb2",
                  "--config.data.category=candle"], id="visa-category-missing"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa", "--config.data.category=candle",
                      "--config.data.root={visa}"), 0, [], id="visa-ok"),
    pytest.param(rows("@mvtec", "--config.data.dataset=mvtec_ad2", "--config.data.category=can",
                      "--config.data.root="), 2,
                 ["data.root is not set",
                  "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"],
                 id="mvtec-ad2-root-unset"),
    pytest.param(rows("@mvtec", "--config.data.dataset=btad", "--config.data.category=01",
                      "--config.data.root={wd}/nope"), 2,
                 ["does not exist", "BTAD", "https://avires.dimi.uniud.it/papers/btad/btad.zip"],
                 id="btad-root-missing"),
    pytest.param(rows("@mvtec", "--config.data.dataset=mpdd", "--config.data.category=tubes",
                      "--config.data.root={wd}/nope"), 2,
                 ["does not exist", "MPDD", "https://github.com/stepanje/MPDD"],
                 id="mpdd-root-missing"),
    pytest.param(rows("@mvtec", "--config.data.dataset=visa", "--config.data.category=candle"),
                 2, ["split_csv/1cls.csv"], id="visa-given-mvtec-root"),
    # --- datasets: what the evaluation reads (file headers, before training) -------------
    pytest.param(rows("@bad:mask-size"), 2,
                 ["Mask {bad}/bottle/ground_truth/crack/000_mask.png is 20x24 (WxH)",
                  "{bad}/bottle/test/crack/000.png is 48x40", "restore the mask"],
                 id="mask-size-differs"),
    pytest.param(rows("@bad:mask-missing"), 2,
                 ["No ground-truth mask for {bad}/bottle/test/crack/001.png",
                  "ground_truth/crack/001_mask.png", "Restore the ground_truth/ folder"],
                 id="mask-missing"),
    pytest.param(rows("@bad:mask-missing", "--mode=train"), 0, [],
                 id="mask-missing-train-only"),
    pytest.param(rows("@bad:mask-text"), 2,
                 ["Cannot read mask {bad}/bottle/ground_truth/crack/000_mask.png",
                  "restore it"], id="mask-not-an-image"),
    pytest.param(rows("@bad:test-empty"), 2,
                 ["Cannot decode image {bad}/bottle/test/crack/000.png",
                  "--config.data.on_corrupt=skip"], id="test-png-empty"),
    pytest.param(rows("@bad:test-text"), 2,
                 ["Cannot decode image {bad}/bottle/test/good/000.png",
                  "--config.data.on_corrupt=skip"], id="test-png-not-an-image"),
    pytest.param(rows("@bad:test-text", "--config.data.on_corrupt=skip"), 0, [],
                 id="test-png-not-an-image-skipped"),
    pytest.param(rows("@loco:no-config"), 2,
                 ["{loco}/breakfast_box has a ground_truth/ folder but no defects_config.json",
                  "copy it from the original download"], id="loco-without-defects-config"),
    pytest.param(rows("@loco:region-size"), 2,
                 ["Mask {loco}/breakfast_box/ground_truth/logical_anomalies/000/000.png is "
                  "10x10 (WxH)"], id="loco-region-size-differs"),
    pytest.param(rows("@loco:"), 0, [], id="loco-ok"),
    # --- found while the run loads its data or teacher (before any training step) -------
    pytest.param(rows("@bad:train-truncated", "@run"), 2,
                 ["Cannot decode image {bad}/bottle/train/good/", "truncated",
                  "--config.data.on_corrupt=skip"], id="train-png-truncated"),
    pytest.param(rows("@bad:train-empty", "@run"), 2,
                 ["Cannot decode image {bad}/bottle/train/good/",
                  "--config.data.on_corrupt=skip"], id="train-png-empty"),
    pytest.param(rows("@bad:train-text", "@run"), 2,
                 ["Cannot decode image {bad}/bottle/train/good/",
                  "--config.data.on_corrupt=skip"], id="train-png-not-an-image"),
    pytest.param(rows("@mvtec", "--config.teacher.weights={golden}/resnet18_d16.pth", "@run"),
                 2, ["resnet18_d16.pth", "conv1.weight", "another architecture"],
                 id="teacher-pth-wrong-architecture"),
    pytest.param(rows("@mvtec", "--config.teacher.weights={tmp}/cut.pth", "@cut-pth", "@run"),
                 2, ["cut.pth", "re-download"], id="teacher-pth-truncated"),
    pytest.param(rows("@mvtec", "--config.teacher.weights={tmp}/evil.pth", "@evil-pth",
                      "@run"), 2, ["evil.pth", "mkdir"], id="teacher-pickle-payload-refused"),
    pytest.param(rows("@mvtec", "@lock", "@run"), 2,
                 ["is in use by another kdjax run", "another --workdir", ".kdjax.lock"],
                 id="workdir-in-use"),
    # --- workdir and --output --------------------------------------------------------------
    pytest.param(rows("@mvtec", "--workdir={file}"), 2,
                 ["--workdir '{file}' cannot be used", "an existing file, not a directory"],
                 id="workdir-is-a-file"),
    pytest.param(rows("@mvtec", "--workdir={file}/run"), 2,
                 ["--workdir '{file}/run' cannot be created", "{file} is a file"],
                 id="workdir-under-a-file"),
    pytest.param(rows("@mvtec", "--workdir={unwritable}/run"), 2,
                 ["--workdir '{unwritable}/run' cannot be created", "another --workdir"],
                 id="workdir-unwritable"),
    pytest.param(rows("--mode=predict"), 2, ["--workdir", "does not exist"],
                 id="predict-no-workdir"),
    pytest.param(rows("--mode=predict", "--input=x.png", "@emptydir"), 2,
                 ["config.json not found", "not a kdjax workdir"], id="predict-not-a-workdir"),
    pytest.param(rows("--mode=predict", "--config=configs/demo.py", "@config.json"), 2,
                 ["--mode=predict needs --input"], id="predict-no-input"),
    pytest.param(rows("--mode=export", "--max_overlays=3", "@config.json"), 2,
                 ["--max_overlays is only used with --mode=predict"], id="export-flag"),
    pytest.param(rows("--mode=predict", "--input={file}", "--output={file}", "@config.json"), 2,
                 ["--output '{file}' cannot be used", "not a directory"],
                 id="predict-output-is-a-file"),
    pytest.param(rows("--mode=export", "--output={file}/export", "@config.json"), 2,
                 ["--output '{file}/export' cannot be created", "{file} is a file"],
                 id="export-output-under-a-file"),
]


# ---------------------------------------------------------------------------
# kdjax.main in this process


class _Started(Exception):
    pass


def run_main(argv, work=None):
    """``python -m kdjax.main ARGV`` in this process: what ``absl.app.run(main,
    flags_parser=_parse_flags)`` does (sys.argv is the command line, which ml_collections
    reads the --config.<key> overrides from), with stdout/stderr captured. Returns (exit
    status, stderr). An exception that main lets through is a traceback (status 1, the
    traceback in stderr). ``work``: replaces ``kdjax.experiment.train_and_evaluate``
    (None: the real one)."""
    import kdjax
    from kdjax import main

    full = ["kdjax", *argv]
    err, out = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    saved_experiment = None
    if work is not None:
        fake = type(sys)("kdjax.experiment")
        fake.train_and_evaluate = work
        saved_experiment = (sys.modules.get("kdjax.experiment"),
                            getattr(kdjax, "experiment", None))
        sys.modules["kdjax.experiment"] = fake
        kdjax.experiment = fake
    sys.argv = full
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rest = main._parse_flags(full)
                main.main(rest)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what app.run would print with a traceback
                code = 1
                err.write(traceback.format_exc())
    finally:
        sys.argv = saved_argv
        main.FLAGS.unparse_flags()
        for name in list(main.FLAGS):  # the override flags ml_collections defined
            if name.startswith("config."):
                delattr(main.FLAGS, name)
        if saved_experiment is not None:
            module, attr = saved_experiment
            if module is None:
                sys.modules.pop("kdjax.experiment", None)
            else:
                sys.modules["kdjax.experiment"] = module
            if attr is None:
                del kdjax.experiment
            else:
                kdjax.experiment = attr
    return code, err.getvalue() + out.getvalue()


# ---------------------------------------------------------------------------
# Fixtures: damaged datasets and files


def _damage(kind: str, root: str) -> None:
    """Damage a fresh tiny MVTec AD root (bottle: 4 train, 1 good and 2 crack test images
    of 48x40, masks) in the way ``kind`` says."""
    cat = os.path.join(root, "bottle")
    if kind == "mask-size":
        Image.new("L", (20, 24)).save(os.path.join(cat, "ground_truth", "crack", "000_mask.png"))
    elif kind == "mask-missing":
        os.remove(os.path.join(cat, "ground_truth", "crack", "001_mask.png"))
    elif kind == "mask-text":
        with open(os.path.join(cat, "ground_truth", "crack", "000_mask.png"), "w") as f:
            f.write("not a mask\n")
    elif kind == "test-empty":
        open(os.path.join(cat, "test", "crack", "000.png"), "wb").close()
    elif kind == "test-text":
        with open(os.path.join(cat, "test", "good", "000.png"), "w") as f:
            f.write("not an image\n")
    elif kind.startswith("train-"):
        path = os.path.join(cat, "train", "good", "000.png")
        if kind == "train-truncated":
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        elif kind == "train-empty":
            open(path, "wb").close()
        else:
            with open(path, "w") as f:
                f.write("not an image\n")
    else:
        raise ValueError(kind)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture
def partial_root(tmp_path, make_mvtec_ad):
    root = make_mvtec_ad(tmp_path / "partial", "bottle", n_train=2, n_good=1,
                         defects=(("crack", 1),))
    os.makedirs(os.path.join(root, "cable", "train", "good"))
    return root


@pytest.fixture
def nocsv_root(tmp_path, mini_visa_root):
    """A VisA tree without its split_csv/ folder."""
    root = str(tmp_path / "visa_nocsv")
    shutil.copytree(mini_visa_root, root)
    shutil.rmtree(os.path.join(root, "split_csv"))
    return root


@pytest.fixture
def unwritable(tmp_path):
    """A directory that cannot be written: read-only for a user; for root (whom
    permissions do not stop) a path the kernel refuses to create."""
    if os.geteuid() == 0:
        yield "/proc/kdjax-test-unwritable"
        return
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    yield str(d)
    d.chmod(0o700)


def _fill(value, places):
    if isinstance(value, str):
        for k, v in places.items():
            value = value.replace("{" + k + "}", v)
    return value


def _expand(args, tmp_path, places, make_mvtec_ad, make_loco):
    """The command line of a row: its tokens expanded (module docstring)."""
    argv, run, wd = [], False, places["wd"]
    for a in args:
        if a == "@mvtec":
            argv += MVTEC + [f"--config.data.root={places['mvtec']}"]
        elif a.startswith("@bad:"):
            root = make_mvtec_ad(tmp_path / "bad", "bottle", n_train=4, n_good=1,
                                 defects=(("crack", 2),))
            _damage(a[5:], root)
            places["bad"] = root
            argv += MVTEC + [f"--config.data.root={root}"]
        elif a.startswith("@loco:"):
            root = make_loco(tmp_path / "loco", n_train=3, n_val=2, n_good=1, n_logical=1,
                             n_structural=1, config=a != "@loco:no-config")
            if a == "@loco:region-size":
                Image.new("L", (10, 10), 255).save(os.path.join(
                    root, "breakfast_box", "ground_truth", "logical_anomalies", "000",
                    "000.png"))
            places["loco"] = root
            argv += ["--config=configs/loco_cad.py", "--config.teacher.weights=random",
                     "--config.teacher.allow_random=True", f"--config.data.root={root}",
                     "--config.data.category=breakfast_box"]
        elif a == "@folder:no-category":
            root = str(tmp_path / "folder")
            os.makedirs(os.path.join(root, "widgets", "images"))
            argv += ["--config=configs/demo.py", "--config.data.dataset=folder",
                     "--config.method=rd4ad", f"--config.data.root={root}"]
        elif a.startswith("@file:"):
            key, value = a[6:].split("=", 1)
            node, _, leaf = key.rpartition(".")
            target = f"c.{node}" if node else "c"
            path = tmp_path / "config_file.py"
            path.write_text("from kdjax.config import load_config\n\n\ndef get_config():\n"
                            "    c = load_config('demo')\n"
                            f"    {target}[{leaf!r}] = {value}\n    return c\n")
            argv.append(f"--config={path}")
        elif a == "@emptydir":
            os.makedirs(wd)
        elif a == "@config.json":  # a trained-looking workdir: just its config.json
            os.makedirs(wd)
            with open(os.path.join(wd, "config.json"), "w") as f:
                json.dump(config_lib.load_config("demo").to_dict(), f, default=str)
        elif a == "@lock":  # a live process (the one that started pytest) holds the lock
            os.makedirs(wd)
            with open(os.path.join(wd, ".kdjax.lock"), "w") as f:
                json.dump({"pid": os.getppid(), "host": socket.gethostname()}, f)
        elif a == "@cut-pth":
            data = open(os.path.join(GOLDEN, "wide_resnet50_2_d16.pth"), "rb").read()
            (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
        elif a == "@evil-pth":
            places["pwned"] = str(tmp_path / "pwned")
            (tmp_path / "evil.pth").write_bytes(
                pickle.dumps({"weight": _Evil(places["pwned"])}, protocol=2))
        elif a == "@run":
            run = True
        else:
            argv.append(_fill(a, places))
    if not any(a.startswith("--workdir") for a in argv):
        argv.append(f"--workdir={wd}")
    return argv, run


@pytest.mark.parametrize("args,code,substrings", ROWS)
def test_bad_input_gives_one_line(args, code, substrings, mini_mvtec_ad_root, partial_root,
                                  mini_visa_root, nocsv_root, unwritable, tmp_path,
                                  make_mvtec_ad, make_loco):
    wd = str(tmp_path / "wd")
    (tmp_path / "a_file.txt").write_text("a file\n")
    places = {"mvtec": mini_mvtec_ad_root, "partial": partial_root, "wd": wd,
              "visa": mini_visa_root, "nocsv": nocsv_root, "file": str(tmp_path / "a_file.txt"),
              "unwritable": unwritable, "golden": GOLDEN, "tmp": str(tmp_path)}
    argv, run = _expand(args, tmp_path, places, make_mvtec_ad, make_loco)
    calls = []
    got, out = run_main(argv, work=None if run else (lambda *a, **k: calls.append(a)))
    assert got == code, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines()
             if ln.startswith("kdjax: ") and not ln.startswith("kdjax: note:")]
    if code == 0:
        assert not lines and len(calls) == 1, out  # accepted: the work would start
        return
    assert len(lines) == 1, out
    message = lines[0]
    assert not calls, "the work started before the error was found"
    assert not os.path.exists(os.path.join(wd, "checkpoints")), "a training step ran"
    assert not os.path.exists(os.path.join(wd, "train_metrics.jsonl"))
    assert not os.path.exists(os.path.join(wd, "synthetic_data")), "data was generated"
    for s in substrings:
        assert _fill(s, places) in message, (_fill(s, places), message)
    if "pwned" in places:
        assert not os.path.exists(places["pwned"]), "the pickle's payload ran"


@pytest.mark.parametrize("argv", [
    ["--config=configs/demo.py", "--config.train.stepz=3"],
    ["--config=configs/demo.py", "--config.cad.affinity_distance=l3"],
    ["--config=configs/demo.py", "--config.train.steps=0", "--config.train.epochs=0"],
])
def test_the_in_process_runner_matches_the_command_line(argv, tmp_path):
    argv = [*argv, f"--workdir={tmp_path / 'wd'}"]
    p = subprocess.run([sys.executable, "-m", "kdjax.main", *argv], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    code, out = run_main(argv, work=lambda *a, **k: None)
    assert (code, out.strip()) == (p.returncode, p.stderr.strip())
    assert code == 2 and out.startswith("kdjax: ") and out.count("\n") == 1


# --- kdjax.main in-process: interruption, bugs, dispatch ---------------------------------

def test_interrupt_is_one_line_and_130_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from kdjax import main

    def interrupted(argv):
        raise KeyboardInterrupt("simulated interruption after step 2")

    monkeypatch.setattr(main, "_run", interrupted)
    with pytest.raises(SystemExit) as e:
        main.main(["kdjax"])
    assert e.value.code == 130
    assert capsys.readouterr().err == (
        "kdjax: interrupted; rerun the same command to resume from the last checkpoint\n")

    def bug(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(main, "_run", bug)
    with pytest.raises(KeyError):  # not turned into a line: the traceback stays
        main.main(["kdjax"])
    with pytest.raises(ValueError):  # a plain ValueError is not a UserError
        monkeypatch.setattr(main, "_run", lambda argv: int("x"))
        main.main(["kdjax"])

    class TrainingDivergedError(RuntimeError):
        pass

    fake_train = type(sys)("kdjax.train")
    fake_train.TrainingDivergedError = TrainingDivergedError
    monkeypatch.setitem(sys.modules, "kdjax.train", fake_train)

    def diverged(argv):
        raise TrainingDivergedError("the loss became nan at step 4")

    monkeypatch.setattr(main, "_run", diverged)
    with pytest.raises(SystemExit) as e:
        main.main(["kdjax"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "kdjax: the loss became nan at step 4\n"


def test_predict_and_export_dispatch_to_inference(monkeypatch, tmp_path):
    from kdjax import main

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text("{}")
    (tmp_path / "a.png").write_bytes(b"")
    calls = []
    fake = type(sys)("kdjax.inference")
    fake.predict_cli = lambda *a, **k: calls.append(("predict", a, k))
    fake.export_cli = lambda *a, **k: calls.append(("export", a, k))
    monkeypatch.setitem(sys.modules, "kdjax.inference", fake)
    import kdjax
    monkeypatch.setattr(kdjax, "inference", fake, raising=False)
    try:
        main.FLAGS(["kdjax", "--mode=predict", f"--workdir={wd}",
                    f"--input={tmp_path / 'a.png'}", "--maps", "--max_overlays=5"])
        main._run(["kdjax"])
        main.FLAGS.unparse_flags()
        main.FLAGS(["kdjax", "--mode=export", f"--workdir={wd}", "--category=bottle"])
        main._run(["kdjax"])
    finally:
        main.FLAGS.unparse_flags()
    assert calls == [
        ("predict", (str(wd), str(tmp_path / "a.png"), str(wd / "predictions")),
         {"category": None, "write_maps": True, "max_overlays": 5}),
        ("export", (str(wd), str(wd / "export")), {"category": "bottle"}),
    ]
