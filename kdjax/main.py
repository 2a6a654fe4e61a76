"""Command line: python -m kdjax.main --config=configs/<name>.py --workdir=<dir>
[--mode=train_and_eval|train|eval] [--config.<key>=<value> ...]"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results and figures.")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config.get("multihost", False):
        from kdjax.distributed import initialize

        initialize(config)
    from kdjax import train

    try:
        train.train_and_evaluate(config, FLAGS.workdir, FLAGS.mode)
    except (ValueError, FileNotFoundError, train.TrainingDivergedError,
            train.WorkdirLockedError) as e:
        # Errors a user can cause: print the message, not a traceback.
        raise SystemExit(f"kdjax: {e}") from None


if __name__ == "__main__":
    app.run(main)
