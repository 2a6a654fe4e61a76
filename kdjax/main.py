"""Command line.

Train and evaluate (``--config`` required)::

    python -m kdjax.main --config=configs/<name>.py --workdir=<dir>
        [--mode=train_and_eval|train|eval] [--config.<key>=<value> ...]

Use a trained workdir (the config comes from <workdir>/config.json)::

    python -m kdjax.main --mode=predict --workdir=<dir> --input=<file|folder|glob>
        [--output=<dir>] [--category=<name>] [--maps] [--max_overlays=100]
    python -m kdjax.main --mode=export --workdir=<dir> [--output=<dir>] [--category=<name>]

Exit status:

* 0: done.
* 2: kdjax refused or stopped with a message it printed as one line,
  ``kdjax: <message>``, on stderr and no traceback: an error the user can fix
  (:class:`kdjax.errors.UserError`: a bad flag, config file, config key or
  value, dataset or workdir), a diverged training run or a workdir in use by
  another run. Config errors are found before any data is read; a dataset that
  cannot serve the run (missing categories, a test set's masks) and a workdir or
  --output that cannot be created or written before any training step.
* 130: interrupted (Ctrl-C): ``kdjax: interrupted; rerun the same command to
  resume from the last checkpoint``.
* 1: anything else: a bug, with Python's traceback (please report it).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from kdjax import config as config_lib
from kdjax.errors import ConfigError, ConfigFileNotFoundError, DataError, UserError, WorkdirError
from kdjax.workdir import check_dir, ensure_dir

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = ("kdjax: interrupted; rerun the same command to resume from the last "
                       "checkpoint")
MODES = ("train_and_eval", "train", "eval", "predict", "export")
TRAINING_MODES = ("train_and_eval", "train", "eval")
# Flags of the predict/export modes: {flag: modes that use it}.
_MODE_FLAGS = {"input": ("predict",), "output": ("predict", "export"),
               "category": ("predict", "export"), "maps": ("predict",),
               "max_overlays": ("predict",)}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (not used by --mode=predict|export: "
    "the workdir's config.json is).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results and figures.")
flags.DEFINE_enum("mode", "train_and_eval", list(MODES), "What to run.")
flags.DEFINE_string("input", None, "--mode=predict: an image file, a folder or a glob.")
flags.DEFINE_string("output", None, "--mode=predict: default <workdir>/predictions; "
                    "--mode=export: default <workdir>/export.")
flags.DEFINE_string("category", None, "--mode=predict|export: the category's model "
                    "(default: the workdir's only one).")
flags.DEFINE_bool("maps", False, "--mode=predict: also write the anomaly maps as TIFF files.")
flags.DEFINE_integer("max_overlays", 100, "--mode=predict: write at most this many overlay "
                     "images.")
flags.mark_flag_as_required("workdir")


# ---------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------

def _one_line_errors() -> tuple:
    """UserError, plus the engine's errors that already carry a complete message."""
    errors = [UserError]
    for module, name in (("kdjax.train", "TrainingDivergedError"),
                         ("kdjax.workdir", "WorkdirLockedError")):
        cls = getattr(sys.modules.get(module), name, None)  # only if already imported
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _exit_one_line(e: BaseException) -> None:
    message = str(e).strip() or type(e).__name__
    sys.stdout.flush()
    sys.stderr.write(f"kdjax: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

def _config_arg(args):
    """The value given to --config in ``args`` (argv without the program), or None."""
    for i, arg in enumerate(args):
        m = re.match(r"^-{1,2}config(=|$)", arg)
        if m:
            if m.group(1) == "=":
                return arg.split("=", 1)[1]
            return args[i + 1] if i + 1 < len(args) else None
    return None


def _override_args(args):
    """[(key, the argument)] of the --config.<key>=... overrides in ``args``."""
    out = []
    for arg in args:
        if re.match(r"^-{1,2}(no)?config\.", arg):
            out.append((arg.split("=", 1)[0].split(".", 1)[1], arg))
    return out


def _unknown_override(config, key: str, arg: str):
    """ConfigError for an override naming a key that ``config`` does not have, else None."""
    import ml_collections

    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not isinstance(node, ml_collections.ConfigDict):
            return ConfigError(
                f"{arg}: config key {prefix!r} is a value ({node!r}), not a section: "
                f"--config.{prefix}=<value> sets it.")
        if part not in node:
            if prefix and len(node) == 0:
                return ConfigError(
                    f"{arg}: config section {prefix!r} is empty in this config: set it whole, "
                    f"e.g. --config.{prefix}=\"{{'{part}': 1.0}}\".")
            known = config_lib.flat_keys(config, sections=True)
            return ConfigError(config_lib.unknown_key_message(key, known, f" ({arg})") + ".")
        node = node[part]
    return None


def _explain_parse_error(e: BaseException, args, path):
    """A UserError explaining why absl/ml_collections could not parse ``args``, or None
    (then the original exception stands: a bug)."""
    overrides = _override_args(args)
    message = str(e)
    if path is None and overrides and isinstance(e, flags.Error):
        return ConfigError(
            f"{overrides[0][1]} overrides a key of a config file: give the file first, "
            f"--config=configs/<name>.py {overrides[0][1]}.")
    if path and overrides:
        try:
            config = config_lib.load_config(path)
        except Exception:
            config = None
        if config is not None:
            for key, arg in overrides:
                err = _unknown_override(config, key, arg)
                if err is not None:
                    return err
    if not isinstance(e, flags.Error):
        return None
    if "Error whilst parsing config file" in message:
        # A ValueError/TypeError raised while running the config file: config_flags put
        # its traceback into the message. One line: the error and where it was raised.
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        last = lines[-1] if lines else message
        last = re.sub(r"^kdjax\.errors\.(\w+): ", "", last)
        where = [ln for ln in lines if ln.startswith("File ")]
        at = f" ({where[-1][5:]})" if where else ""
        return ConfigError(f"--config={path}: {last}{at}")
    return UserError(message)


def _parse_flags(argv):
    """absl's flag parsing, with every error the user can cause (a missing config file, an
    unknown or badly typed --config.<key>, an unknown flag) as one line and exit status 2."""
    try:
        args = list(argv[1:])
        try:
            args = FLAGS.read_flags_from_files(args, force_gnu=False)
        except Exception:  # absl reports a bad --flagfile itself below
            pass
        path = _config_arg(args)
        if path is not None:
            file = path.split(":", 1)[0]
            if not os.path.isfile(file):
                raise ConfigFileNotFoundError(
                    config_lib.missing_config_message(file, f" (--config={path})"))
        try:
            rest = FLAGS(argv)
        except Exception as e:
            explained = _explain_parse_error(e, args, path)
            if explained is None:
                raise
            raise explained from None
        value = FLAGS["config"].value
        if type(value).__name__ == "_ErrorConfig":  # config_flags defers load errors (OSError)
            err = object.__getattribute__(value, "_error")
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            raise ConfigError(f"--config={path}: the config file could not be loaded: "
                              f"{lines[-1].strip() if lines else err!r}")
        return rest
    except UserError as e:
        _exit_one_line(e)


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------

def _check_mode_flags(mode: str) -> None:
    for name, modes in _MODE_FLAGS.items():
        if FLAGS[name].present and mode not in modes:
            extra = (" (the categories to train are --config.data.category=...)"
                     if name == "category" and mode in TRAINING_MODES else "")
            raise ConfigError(
                f"--{name} is only used with --mode={' or --mode='.join(modes)}, not "
                f"--mode={mode}{extra}.")
    if FLAGS.max_overlays < 0:
        raise ConfigError(f"--max_overlays={FLAGS.max_overlays}: must be >= 0.")


def _trained_workdir(workdir: str, mode: str) -> None:
    if not os.path.isdir(workdir):
        raise WorkdirError(
            f"--workdir {workdir!r} does not exist: --mode={mode} needs the workdir of a "
            "training run (python -m kdjax.main --config=configs/<name>.py --workdir=<dir>).")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise WorkdirError(
            f"{os.path.join(workdir, 'config.json')} not found: --workdir {workdir!r} is not "
            f"a kdjax workdir; --mode={mode} needs the workdir of a training run "
            "(python -m kdjax.main --config=configs/<name>.py --workdir=<dir>).")


def _entry(name: str):
    """kdjax.inference.<name> (imported here: it imports JAX), else kdjax.predict.<name>."""
    import importlib

    try:
        fn = getattr(importlib.import_module("kdjax.inference"), name, None)
    except ModuleNotFoundError as e:
        if e.name != "kdjax.inference":
            raise
        fn = None
    if fn is None:
        fn = getattr(importlib.import_module("kdjax.predict"), name)
    return fn


def _use_trained(mode: str, workdir: str) -> None:
    if FLAGS["config"].present:
        sys.stderr.write(f"kdjax: note: --config is not used with --mode={mode}; the "
                         f"config is {os.path.join(workdir, 'config.json')}.\n")
    _trained_workdir(workdir, mode)
    if mode == "predict":
        source = FLAGS.input
        if not source:
            raise ConfigError(
                "--mode=predict needs --input=<an image file, a folder or a glob such as "
                "'images/*.png'>.")
        if not any(ch in source for ch in "*?[") and not os.path.exists(source):
            raise DataError(f"--input {source!r}: no such file or folder.")
        output = FLAGS.output or os.path.join(workdir, "predictions")
        check_dir(output, "--output")
        _entry("predict_cli")(workdir, source, output, category=FLAGS.category,
                              write_maps=FLAGS.maps, max_overlays=FLAGS.max_overlays)
    else:
        output = FLAGS.output or os.path.join(workdir, "export")
        check_dir(output, "--output")
        _entry("export_cli")(workdir, output, category=FLAGS.category)


def _run(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are written "
                        "--name=value; see --help).")
    mode, workdir = FLAGS.mode, FLAGS.workdir
    _check_mode_flags(mode)
    if mode not in TRAINING_MODES:
        _use_trained(mode, workdir)
        return
    config = FLAGS.config
    if config is None:
        raise ConfigError(f"--mode={mode} needs --config=configs/<name>.py (e.g. "
                          "--config=configs/demo.py).")
    config_lib.validate(config, mode)  # before jax is imported: config errors come at once
    ensure_dir(workdir, "--workdir")  # a file, a path under a file, an unwritable place
    if config.get("multihost", False):
        from kdjax.distributed import initialize

        initialize(config)
    from kdjax import experiment

    experiment.train_and_evaluate(config, workdir, mode)


def main(argv):
    from kdjax import console

    console.install()  # other libraries' INFO lines: log.txt only, unless --verbosity
    try:
        _run(argv)
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        # kdjax.train.TrainingInterrupted says at which step and what the last checkpoint is
        detail = str(e).strip() if type(e).__name__ == "TrainingInterrupted" else ""
        sys.stderr.write((f"kdjax: {detail}" if detail else INTERRUPTED_MESSAGE) + "\n")
        sys.stderr.flush()
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if isinstance(e, _one_line_errors()):
            _exit_one_line(e)
        raise


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
