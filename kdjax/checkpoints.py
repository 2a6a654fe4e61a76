"""Orbax checkpoints of the train state: save, restore (skipping unreadable ones), keep
only the last; the training settings recorded beside them (``training_config.json``,
:func:`check_training_config`: a rerun with other settings is refused, and
``train.restart=True`` trains over once)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax

from kdjax.errors import ConfigError, UserError

log = logging.getLogger("kdjax")


def checkpoint_manager(ckpt_dir: str, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=opts)


def save(mngr, ts) -> None:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(ts["step"]))
    mngr.save(step, args=ocp.args.StandardSave(ts), force=True)
    mngr.wait_until_finished()


class CorruptCheckpointError(UserError):
    """No checkpoint of a directory can be read."""


def restore(mngr, ts_template):
    """The latest readable checkpoint (None when there is none). A checkpoint that
    cannot be read (a truncated array file, an interrupted copy) is skipped with a
    warning naming it, and the one before it is tried."""
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, ts_template)
    steps = sorted(mngr.all_steps(), reverse=True)
    bad = []
    for step in steps:
        try:
            out = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax / TensorStore raise many kinds
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("Checkpoint %s is unreadable (%s); deleting it and trying the one "
                        "before it.", os.path.join(str(mngr.directory), str(step)), first)
            bad.append(step)
            continue
        for b in bad:  # training saves these steps again
            mngr.delete(b)
        return out
    if steps:
        raise CorruptCheckpointError(
            f"No checkpoint in {mngr.directory} can be read (steps {', '.join(map(str, steps))}): "
            f"they are damaged. Delete {mngr.directory} to train this category from scratch, "
            "or use another --workdir.")
    return None


def keep_only_latest(mngr) -> None:
    """Delete every checkpoint but the latest (a finished run needs only that one
    to resume or re-evaluate; the model artifact holds what inference needs)."""
    latest = mngr.latest_step()
    for step in mngr.all_steps():
        if step != latest:
            mngr.delete(step)
    mngr.wait_until_finished()


TRAINING_CONFIG = "training_config.json"
# Keys that do not change what training computes: a rerun may change them freely.
_NOT_TRAINING = ("eval", "report", "variants", "targets", "targets_by", "targets_source",
                 "ablation", "multihost", "distributed", "data.root", "data.on_corrupt",
                 "train.log_every",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.steps_per_call",
                 "train.restart", "train.cache_teacher",
                 "train.cache_teacher_max_gb", "data.val_fraction", "teacher.allow_random",
                 "data.input", "data.cache", "train.resident_max_gb",
                 "data.source", "data.tfds_dir", "data.mask_resize")


def training_keys(config) -> dict:
    """{dotted key: value} of everything that changes what training computes."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if any(key == s or key.startswith(s + ".") for s in _NOT_TRAINING):
                continue
            if hasattr(v, "items") and not isinstance(v, str):
                walk(v, key + ".")
            else:
                flat[key] = list(v) if isinstance(v, tuple) else v
    walk(json.loads(config.to_json_best_effort()), "")
    return flat


def _differing(before: dict, now: dict) -> list:
    """The training keys whose recorded value (``before``) differs from ``now``; a key
    recorded before it existed had its default value then."""
    from kdjax.config import base_config

    default = training_keys(base_config())
    return sorted(k for k in set(before) | set(now)
                  if before.get(k, default.get(k)) != now.get(k))


def check_training_config(ckpt_dir: str, config) -> None:
    """Record the training settings of ``ckpt_dir`` (``training_config.json``); refuse a
    rerun whose settings differ (a resumed run would mix two trainings), naming the keys.

    ``train.restart=True`` discards the directory's checkpoints when they were trained
    with other settings (or their settings were never recorded) and trains over. The
    checkpoints of a training with exactly this run's settings are kept and resumed: the
    restart applies once, so rerunning the same command (``train.restart=True``
    included) after an interruption continues where it stopped instead of starting over
    again. To train over with unchanged settings, delete the directory."""
    path = os.path.join(ckpt_dir, TRAINING_CONFIG)
    now = training_keys(config)
    before = None
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
    diff = _differing(before, now) if before is not None else []
    if bool(config.train.get("restart", False)) and os.path.isdir(ckpt_dir):
        if before is not None and not diff:
            log.info("train.restart=True: %s holds a training with these same settings; "
                     "resuming it (delete that directory to train over).", ckpt_dir)
        else:
            why = ("other settings: " + ", ".join(diff[:6])) if diff else "unrecorded settings"
            log.warning("train.restart=True: %s holds a training with %s; deleting its "
                        "checkpoints and training over.", ckpt_dir, why)
            shutil.rmtree(ckpt_dir)
            before, diff = None, []
    if before is not None:
        if diff:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
            raise ConfigError(
                f"{ckpt_dir} holds a training with other settings ({shown}"
                f"{', ...' if len(diff) > 6 else ''}): rerun with the same settings to resume, "
                "use another --workdir, or add --config.train.restart=True to start this "
                "training over.")
        return
    if jax.process_index() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(now, f, indent=1, sort_keys=True, default=str)
