"""Bad inputs give one line, "kdjax: <message>", exit status 2, and no traceback; config
errors are found before any data is read or any training step runs.

One table: each row is (how, arguments, exit status, substrings of the message).

* "cli": ``python -m kdjax.main <arguments> --workdir=<tmp>`` in a subprocess (cheap: the
  command line imports no JAX before the config is validated). The output must hold no
  traceback and the workdir no checkpoints/ or train_metrics.jsonl.
* "validate": ``config.validate(load_config("demo", overrides))`` in-process; the error
  must be a kdjax.errors.UserError (exit status 2 on the command line), a ValueError (for
  older callers), and one line.

Placeholders in arguments: {mvtec} is the conftest's mini MVTec AD root (bottle, grid),
{partial} a root with bottle and an empty cable category, {visa} the mini VisA root
(candle, pcb1), {nocsv} a VisA root without split_csv/, {wd} the workdir; "@config.json" / "@emptydir"
make the workdir with a config.json / empty; "@key" sets a key as a config file would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdjax import config as config_lib
from kdjax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MVTEC = {"data.dataset": "mvtec_ad", "data.root": "{mvtec}", "data.category": "bottle",
         "method": "rd4ad", "teacher.weights": "random"}


def cli(*args):
    return ("cli", list(args))


def val(overrides, base=True):
    return ("validate", {**(MVTEC if base else {}), **overrides})


ROWS = [
    # --- command line: flags, config file, config keys --------------------------------
    pytest.param(*cli("--config=configs/nope.py"), 2,
                 ["No config file 'configs/nope.py'", "demo.py"], id="config-file-missing"),
    pytest.param(*cli("--config=configs/dmo.py"), 2,
                 ["Did you mean configs/demo.py"], id="config-file-typo"),
    pytest.param(*cli("--config=configs/demo.py", "--config.train.stepz=3"), 2,
                 ["unknown config key 'train.stepz'", "closest known keys: train.steps"],
                 id="override-unknown-key"),
    pytest.param(*cli("--config=configs/demo.py", "--config.train.lr=1e30"), 2,
                 ["unknown config key 'train.lr'", "train.learning_rate"],
                 id="override-abbreviated-key"),
    pytest.param(*cli("--config=configs/demo.py", "--config.train.steps=abc"), 2,
                 ["--config.train.steps=abc", "int"], id="override-bad-type"),
    pytest.param(*cli("--config=configs/loco_cad.py:nonsense"), 2,
                 ["takes no argument or ':ablation'", "get_config"],
                 id="config-file-raises"),
    pytest.param(*cli("--config=configs/demo.py", "--mode=bogus"), 2,
                 ["--mode=bogus", "predict"], id="bad-mode"),
    pytest.param(*cli("--mode=train"), 2, ["--mode=train needs --config"], id="no-config"),
    pytest.param(*cli("--config=configs/demo.py", "--input=x.png"), 2,
                 ["--input is only used with --mode=predict"], id="predict-flag-in-train"),
    # validate() on the command line: before any data is read (and before JAX is imported)
    pytest.param(*cli("--config=configs/demo.py", "--config.train.optimizer=lion"), 2,
                 ["train.optimizer='lion'", "optimizer=adam"], id="cli-optimizer"),
    pytest.param(*cli("--config=configs/demo.py", "--config.data.dataset=mvtec_ad",
                      "--config.data.root={mvtec}", "--config.data.category=all"), 2,
                 ["13 of 15 categories", "cable", "--config.data.category=bottle,grid"],
                 id="cli-partial-download"),
    # predict / export: the config comes from the workdir
    pytest.param(*cli("--mode=predict"), 2, ["--workdir", "does not exist"],
                 id="predict-no-workdir"),
    pytest.param(*cli("--mode=predict", "--input=x.png", "@emptydir"), 2,
                 ["config.json not found", "not a kdjax workdir"], id="predict-not-a-workdir"),
    pytest.param(*cli("--mode=predict", "--config=configs/demo.py", "@config.json"), 2,
                 ["--mode=predict needs --input"], id="predict-no-input"),
    pytest.param(*cli("--mode=export", "--max_overlays=3", "@config.json"), 2,
                 ["--max_overlays is only used with --mode=predict"], id="export-flag"),
    # --- validate(): config values -----------------------------------------------------
    pytest.param(*val({"train.optimizer": "lion"}), 2, ["train.optimizer='lion'", "adam"],
                 id="optimizer"),
    pytest.param(*val({"train.weight_decay": 1e-4}), 2,
                 ["train.weight_decay=0.0001", "'rd4ad'", "efficientad", "weight_decay=0"],
                 id="weight-decay-not-efficientad"),
    pytest.param(*val({"train.steps": -1}), 2, ["train.steps=-1", ">= 0"], id="steps-negative"),
    pytest.param(*val({"train.steps": 0, "train.epochs": 0}), 2,
                 ["train.steps=0 and train.epochs=0", "nothing to train"], id="no-steps"),
    pytest.param(*val({"train.batch_size": 0}), 2, ["train.batch_size=0", ">= 1"],
                 id="train-batch"),
    pytest.param(*val({"eval.batch_size": 0}), 2, ["eval.batch_size=0", ">= 1"],
                 id="eval-batch"),
    pytest.param(*val({"train.learning_rate": float("nan")}), 2,
                 ["train.learning_rate=nan", "finite"], id="lr-nan"),
    pytest.param(*val({"train.learning_rate": float("inf")}), 2,
                 ["train.learning_rate=inf"], id="lr-inf"),
    pytest.param(*val({"train.learning_rate": -0.1}), 2, ["train.learning_rate=-0.1", "> 0"],
                 id="lr-negative"),
    pytest.param(*val({"train.learning_rate": 1e30}), 0, [], id="lr-huge-is-allowed"),
    pytest.param(*val({"train.steps_per_call": 0}), 2, ["train.steps_per_call=0"],
                 id="steps-per-call"),
    pytest.param(*val({"train.checkpoint_every": 0}), 2, ["train.checkpoint_every=0"],
                 id="checkpoint-every"),
    pytest.param(*val({"eval.threshold": "best"}), 2,
                 ["eval.threshold='best'", "'auto'", "'f1_val'", "'quantile'", "a number"],
                 id="threshold-word"),
    pytest.param(*val({"eval.threshold": "nan"}), 2, ["eval.threshold='nan'", "finite"],
                 id="threshold-nan"),
    pytest.param(*val({"eval.threshold": "0.5"}), 0, [], id="threshold-number-as-string"),
    pytest.param(*val({"eval.threshold": 0.5}), 0, [], id="threshold-number"),
    pytest.param(*val({"eval.threshold_quantile": 1.0}), 2,
                 ["eval.threshold_quantile=1.0", "(0, 1)"], id="threshold-quantile"),
    pytest.param(*val({"data.validation_fraction": 1.0}), 2,
                 ["data.validation_fraction=1.0", "[0, 1)"], id="validation-fraction"),
    pytest.param(*val({"data.validation_fraction": 0.0}), 0, [], id="validation-fraction-0"),
    pytest.param(*val({"data.val_fraction": 0.3, "data.validation_fraction": 0.2}), 2,
                 ["deprecated", "data.validation_fraction"], id="val-fraction-conflict"),
    pytest.param(*val({"eval.compute_dtype": "float16"}), 2,
                 ["eval.compute_dtype='float16'", "bfloat16"], id="eval-dtype"),
    pytest.param(*val({"report.thumbnail_size": 8}), 2,
                 ["report.thumbnail_size=8", "between 16 and 1024"], id="report-thumbnail"),
    pytest.param(*val({"report.tensorboard_images": -1}), 2,
                 ["report.tensorboard_images=-1", ">= 0"], id="report-tensorboard-images"),
    pytest.param(*val({"eval.quantiles": (0.995, 0.9)}), 2,
                 ["eval.quantiles=(0.995, 0.9)", "two increasing values"], id="quantiles"),
    pytest.param(*val({"teacher.weights": "{mvtec}"}), 2,
                 ["is a directory", ".pth or .npz FILE"], id="weights-directory"),
    pytest.param(*val({"teacher.weights": "{mvtec}/nope.pth"}), 2,
                 ["nope.pth", "no such file"], id="weights-missing"),
    pytest.param(*val({"@train.stepz": 3}), 2,
                 ["unknown config key 'train.stepz'", "train.steps", "config file"],
                 id="config-file-unknown-key"),
    pytest.param(*val({"@ablation": True}), 0, [], id="top-level-plain-value-allowed"),
    pytest.param(*val({"@modle": {"x": 1}}), 2, ["unknown config key 'modle'"],
                 id="top-level-unknown-section"),
    # --- validate(): data ----------------------------------------------------------------
    pytest.param(*val({"data.category": "all"}), 2,
                 ["data.category='all'", "13 of 15", "capsule", "{mvtec}",
                  "--config.data.category=bottle,grid"], id="category-all-partial"),
    pytest.param(*val({"data.category": "bottle,cable", "data.root": "{partial}"}), 2,
                 ["cable", "has no training images", "--config.data.category=bottle"],
                 id="category-empty"),
    pytest.param(*val({"data.category": "bottle,grid"}), 0, [], id="category-list-present"),
    pytest.param(*val({"data.category": "botle"}), 2, ["'botle'", "Did you mean 'bottle'"],
                 id="category-typo"),
    pytest.param(*val({"data.root": "{mvtec}/bottle"}), 2, ["itself a category folder"],
                 id="root-one-level-too-deep"),
    # --- validate(): datasets and preprocessing (docs/DATA.md) ----------------------------
    pytest.param(*val({"data.dataset": "visaa"}), 2,
                 ["Unknown dataset 'visaa'", "Did you mean 'visa'", "mvtec_ad2"],
                 id="dataset-typo"),
    pytest.param(*val({"data.resize": "squash"}), 2,
                 ["data.resize='squash'", "'stretch'", "'pad'", "'center_crop'"], id="resize"),
    pytest.param(*val({"data.image_filter": "area"}), 2,
                 ["data.image_filter='area'", "'lanczos'"], id="image-filter"),
    pytest.param(*val({"data.mask_resize": "bicubic"}), 2,
                 ["data.mask_resize='bicubic'", "'nearest'"], id="mask-resize"),
    pytest.param(*val({"data.source": "hdf5"}), 2, ["data.source='hdf5'", "'tfds'"],
                 id="source"),
    pytest.param(*val({"data.dataset": "btad", "data.category": "01", "data.source": "tfds"}),
                 2, ["'btad' has no TFDS builder", "--config.data.source=files"],
                 id="source-tfds-without-builder"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candel"}), 2,
                 ["Unknown visa category 'candel'", "Did you mean 'candle'"],
                 id="visa-category-typo"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candle",
                       "data.root": "{nocsv}"}), 2,
                 ["split_csv/1cls.csv", "https://github.com/amazon-science/spot-diff"],
                 id="visa-root-without-split-csv"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candle",
                       "data.root": "{wd}/nope"}), 2,
                 ["data.root '{wd}/nope' does not exist", "VisA",
                  "https://github.com/amazon-science/spot-diff"], id="visa-root-missing"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candle,pcb2",
                       "data.root": "{visa}"}), 2,
                 ["1 of 2 categories is not in data.root", "pcb2", "--config.data.category=candle"],
                 id="visa-category-missing"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candle",
                       "data.root": "{visa}"}), 0, [], id="visa-ok"),
    pytest.param(*val({"data.dataset": "mvtec_ad2", "data.category": "can", "data.root": ""}), 2,
                 ["data.root is not set", "https://www.mvtec.com/company/research/datasets/"
                  "mvtec-ad-2"], id="mvtec-ad2-root-unset"),
    pytest.param(*val({"data.dataset": "btad", "data.category": "01",
                       "data.root": "{wd}/nope"}), 2,
                 ["does not exist", "BTAD", "https://avires.dimi.uniud.it/papers/btad/btad.zip"],
                 id="btad-root-missing"),
    pytest.param(*val({"data.dataset": "mpdd", "data.category": "tubes",
                       "data.root": "{wd}/nope"}), 2,
                 ["does not exist", "MPDD", "https://github.com/stepanje/MPDD"],
                 id="mpdd-root-missing"),
    pytest.param(*val({"data.dataset": "visa", "data.category": "candle",
                       "data.root": "{mvtec}"}), 2, ["split_csv/1cls.csv"],
                 id="visa-given-mvtec-root"),
]


@pytest.fixture
def partial_root(tmp_path, make_mvtec_ad):
    root = make_mvtec_ad(tmp_path / "partial", "bottle", n_train=2, n_good=1,
                         defects=(("crack", 1),))
    os.makedirs(os.path.join(root, "cable", "train", "good"))
    return root


@pytest.fixture
def nocsv_root(tmp_path, mini_visa_root):
    """A VisA tree without its split_csv/ folder."""
    import shutil

    root = str(tmp_path / "visa_nocsv")
    shutil.copytree(mini_visa_root, root)
    shutil.rmtree(os.path.join(root, "split_csv"))
    return root


def _fill(value, places):
    if isinstance(value, str):
        for k, v in places.items():
            value = value.replace("{" + k + "}", v)
    return value


@pytest.mark.parametrize("how,args,code,substrings", ROWS)
def test_bad_input_gives_one_line(how, args, code, substrings, mini_mvtec_ad_root,
                                  partial_root, mini_visa_root, nocsv_root, tmp_path):
    wd = str(tmp_path / "wd")
    places = {"mvtec": mini_mvtec_ad_root, "partial": partial_root, "wd": wd,
              "visa": mini_visa_root, "nocsv": nocsv_root}
    substrings = [_fill(s, places) for s in substrings]
    if how == "cli":
        argv = [_fill(a, places) for a in args]
        if "@emptydir" in argv:
            argv.remove("@emptydir")
            os.makedirs(wd)
        if "@config.json" in argv:  # a trained-looking workdir: just its config.json
            argv.remove("@config.json")
            os.makedirs(wd)
            with open(os.path.join(wd, "config.json"), "w") as f:
                json.dump(config_lib.load_config("demo").to_dict(), f, default=str)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        p = subprocess.run([sys.executable, "-m", "kdjax.main", *argv, f"--workdir={wd}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        out = p.stdout + p.stderr
        assert p.returncode == code, out
        assert "Traceback" not in out, out
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("kdjax: ")
                 and not ln.startswith("kdjax: note:")]
        assert len(lines) == 1, out
        message = lines[0]
        assert not os.path.exists(os.path.join(wd, "checkpoints"))
        assert not os.path.exists(os.path.join(wd, "train_metrics.jsonl"))
    else:
        overrides = {k: _fill(v, places) for k, v in args.items() if not k.startswith("@")}
        config = config_lib.load_config("demo", overrides)
        with config.unlocked():  # what a config file may set: keys load_config refuses
            for k, v in args.items():
                if k.startswith("@"):
                    node, *path = k[1:].split(".")
                    if path:
                        config[node][path[0]] = v
                    else:
                        config[node] = v
        try:
            config_lib.validate(config)
        except errors.UserError as e:
            assert isinstance(e, ValueError)  # older callers catch ValueError
            got, message = 2, str(e)
            assert "\n" not in message, message
        else:
            got, message = 0, ""
        assert got == code, message
    for s in substrings:
        assert s in message, (s, message)


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
