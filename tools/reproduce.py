"""Reproduce a paper's table: every category it lists, ours beside theirs.

    python tools/reproduce.py --config=configs/<name>.py --config.data.root=/path/to/data \
        [--workdir=runs/reproduce/<name>] [--config.<key>=<value> ...]

The categories are those for which the config's paper numbers (``targets``, see
kdjax.config.paper_targets) give a value, or the part of them named by
``--config.data.category=a,b``. Each category is an ordinary kdjax run,
``python -m kdjax.main --config=... --config.data.category=<category>
--workdir=<workdir>/<category>`` with the same config arguments, one after the
other. The table of ours, the paper's and the difference (ours - paper, in points)
is printed and written to ``<workdir>/reproduce.md`` and ``reproduce.json`` after
each category.

Resumable: rerun the same command. A category whose workdir holds its
results.json from the same config is not run again; an interrupted one resumes
from its last checkpoint (kdjax's own resume). A category run with other
settings is run again through kdjax, which evaluates again when only evaluation
settings changed and refuses changed training settings (add
``--config.train.restart=True`` to train over).

Exit status: 0 done; 2 a bad argument, config, dataset or workdir (one line
``reproduce: ...`` or kdjax's own ``kdjax: ...``); 130 interrupted (rerun to
continue); else the failing category's kdjax exit status.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from kdjax import config as config_lib  # noqa: E402
from kdjax import evaluate  # noqa: E402
from kdjax.errors import ConfigError, UserError, WorkdirError  # noqa: E402
from kdjax.jsonio import write_json  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
USAGE = ("usage: python tools/reproduce.py --config=configs/<name>.py "
         "--config.data.root=<dataset> [--workdir=<dir>] [--config.<key>=<value> ...]")
# Keys of the recorded config.json that may change between runs without running a
# finished category again (where the data lives).
_IGNORED_KEYS = (("data", "root"),)


class Interrupted(Exception):
    pass


class CategoryFailed(Exception):
    def __init__(self, category, code):
        super().__init__(category, code)
        self.category, self.code = category, code


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def split_args(args):
    """(config arguments, as given, in order; --workdir value or None).

    Only --config=..., --config.<key>=<value> (or --noconfig.<key> / two-token forms)
    and --workdir are accepted: the config arguments are handed to every category's
    ``python -m kdjax.main`` unchanged."""
    config_args, workdir = [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help", "-help"):
            print(__doc__)
            sys.exit(0)
        m = re.match(r"^-{1,2}workdir(=(.*))?$", a)
        if m:
            if m.group(1) is None:
                if i + 1 >= len(args):
                    raise ConfigError(f"--workdir needs a value. {USAGE}")
                workdir, i = args[i + 1], i + 2
            else:
                workdir, i = m.group(2), i + 1
            continue
        m = re.match(r"^-{1,2}(no)?config(\.[^=]*)?(=.*)?$", a)
        if not m:
            raise ConfigError(f"unexpected argument {a!r}: tools/reproduce.py takes only "
                              f"--config, --config.<key>=<value> and --workdir. {USAGE}")
        config_args.append(a)
        # "--config PATH" / "--config.key VALUE": absl's two-token form (not for booleans
        # written "--config.key" or "--noconfig.key", whose next token is another flag).
        if (m.group(3) is None and not m.group(1) and i + 1 < len(args)
                and not args[i + 1].startswith("-")):
            config_args.append(args[i + 1])
            i += 1
        i += 1
    if not any(re.match(r"^-{1,2}config(=|$)", a) for a in config_args):
        raise ConfigError(f"--config=configs/<name>.py is required. {USAGE}")
    return config_args, workdir


def _config_path(config_args) -> str:
    for i, a in enumerate(config_args):
        if re.match(r"^-{1,2}config=", a):
            return a.split("=", 1)[1]
        if re.match(r"^-{1,2}config$", a):
            return config_args[i + 1]
    return ""


def load(config_args):
    """The config as ``python -m kdjax.main`` parses these arguments (same file, same
    overrides, same one-line errors: kdjax.main's own parser)."""
    from kdjax import main as kmain

    kmain._parse_flags(["kdjax.main", "--workdir=unused", *config_args])
    return kmain.FLAGS.config


def default_workdir(config_args) -> str:
    path = _config_path(config_args)
    stem, _, arg = os.path.basename(path).partition(":")
    stem = stem[:-3] if stem.endswith(".py") else stem
    name = stem + (f"_{arg}" if arg else "")
    return os.path.join("runs", "reproduce", name)


def plan(config):
    """(targets, source, categories to run) of a config; ConfigError when it names no
    per-category paper numbers or a category they do not list."""
    targets, source = config_lib.paper_targets(config)
    listed = config_lib.paper_categories(targets)
    if not listed:
        what = ("names no paper numbers" if not targets else
                "names only the paper's mean, no per-category numbers")
        by = str(config.get("targets_by", "") or "")
        if by and config.get("targets"):
            what = (f"has no paper numbers for {by}={config_lib._dotted(config, by)!r} "
                    f"(it has them for {', '.join(str(k) for k in config.targets)})")
        raise ConfigError(
            f"the config {what} (config.targets): tools/reproduce.py needs a config whose "
            "targets list the paper's categories, e.g. configs/mvtec_rd4ad.py, "
            "configs/mvtec_mrkd.py or configs/mvtec_efficientad.py.")
    spec = str(config.data.category).strip()
    if spec in ("", "all"):
        return targets, source, listed
    asked = [c.strip() for c in spec.split(",") if c.strip()]
    extra = [c for c in asked if c not in listed]
    if extra:
        raise ConfigError(
            f"data.category={spec!r}: the paper lists no numbers for {', '.join(extra)}; its "
            f"categories are {', '.join(listed)} (leave data.category out to run them all).")
    return targets, source, [c for c in listed if c in asked]


def category_config(config, category):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.data.category = category
    return c


# ---------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------

def _comparable(d):
    d = copy.deepcopy(d)
    for path in _IGNORED_KEYS:
        node = d
        for k in path[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return d


def finished(config, category, sub) -> bool:
    """Whether ``sub`` holds this category's results from this very config."""
    try:
        with open(os.path.join(sub, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(sub, "config.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    if category not in (results.get("categories") or {}):
        return False
    c = category_config(config, category)
    config_lib.validate(c)  # as kdjax.main does before writing config.json
    now = json.loads(c.to_json_best_effort())
    return _comparable(now) == _comparable(recorded)


def run_category(config_args, category, sub) -> None:
    """One category through kdjax's normal run path, as a user would run it."""
    given = [a for a in config_args if not re.match(r"^-{1,2}config\.data\.category=", a)]
    cmd = [sys.executable, "-m", "kdjax.main", *given,
           f"--config.data.category={category}", f"--workdir={sub}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    print(f"reproduce: [{category}] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save and stop
            interrupted = True
    if code == EXIT_INTERRUPTED or (interrupted and code != 0):
        raise Interrupted(category)
    if code != 0:
        raise CategoryFailed(category, code)


def collect(planned, workdir):
    """{category: {metric: fraction}} and the notes/warnings of the finished categories."""
    ours, warnings, notes = {}, [], []
    for c in planned:
        try:
            with open(os.path.join(workdir, c, "results.json")) as f:
                res = json.load(f)
        except (OSError, ValueError):
            continue
        if c not in (res.get("categories") or {}):
            continue
        ours[c] = {k: (float("nan") if v is None else v)
                   for k, v in res["categories"][c].items()}
        if res.get("warning") and res["warning"] not in warnings:
            warnings.append(res["warning"])
        for n in res.get("notes") or []:
            if n not in notes:
                notes.append(n)
    return ours, warnings, notes


def write_report(workdir, config, config_args, targets, source, planned) -> str:
    ours, warnings, notes = collect(planned, workdir)
    comp = evaluate.paper_comparison(ours, targets, planned)
    todo = [c for c in planned if c not in ours]
    head = [f"# Reproduction: {config.method} on {config.data.dataset}", "",
            f"Config: `{' '.join(config_args)}`", "",
            f"Paper numbers: {source}" if source else "Paper numbers: config.targets", "",
            "Percent, one decimal; Δ = ours - paper in points (between the values as shown). "
            f"Each category's own results are in {os.path.join(workdir, '<category>')}/"
            "results.md.", ""]
    for label, items in (("Warning", warnings), ("Note", notes)):
        for n in items:
            head += [f"**{label}:** {n}", ""]
    if todo:
        head += [f"**Not finished yet** ({len(todo)} of {len(planned)}): {', '.join(todo)}. "
                 "Rerun the same command to continue; the mean is over the finished "
                 "categories.", ""]
    text = "\n".join(head + evaluate.paper_comparison_markdown(comp)) + "\n"
    out = {"method": config.method, "dataset": config.data.dataset,
           "config_args": list(config_args), "targets_source": source,
           "categories": planned, "finished": [c for c in planned if c in ours],
           "warnings": warnings, "notes": notes,
           "workdirs": {c: os.path.join(workdir, c) for c in planned},
           "comparison": comp}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "reproduce.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(workdir, "reproduce.json"), out)
    return text


# ---------------------------------------------------------------------------

def reproduce(args) -> int:
    config_args, workdir = split_args(args)
    config = load(config_args)
    targets, source, planned = plan(config)
    # Up-front checks of every category (data.root, the folders, the config values).
    config_lib.validate(category_config(config, ",".join(planned)))
    workdir = workdir or default_workdir(config_args)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir!r} is a file: give a folder.")
    print(f"reproduce: {len(planned)} categories of {config.method} on "
          f"{config.data.dataset} in {workdir}: {', '.join(planned)}", flush=True)
    for c in planned:
        sub = os.path.join(workdir, c)
        if finished(config, c, sub):
            print(f"reproduce: [{c}] finished earlier ({os.path.join(sub, 'results.json')}): "
                  "skipped", flush=True)
            continue
        run_category(config_args, c, sub)
        write_report(workdir, config, config_args, targets, source, planned)
    text = write_report(workdir, config, config_args, targets, source, planned)
    print(text)
    print(f"reproduce: written to {os.path.join(workdir, 'reproduce.md')} and reproduce.json",
          flush=True)
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return reproduce(args)
    except UserError as e:
        sys.stderr.write(f"reproduce: {str(e).strip()}\n")
        return EXIT_USER_ERROR
    except Interrupted as e:
        sys.stderr.write(f"reproduce: interrupted in category {e.args[0]}; rerun the same "
                         "command to continue from its last checkpoint.\n")
        return EXIT_INTERRUPTED
    except CategoryFailed as e:
        sys.stderr.write(f"reproduce: category {e.category} stopped (kdjax exit status "
                         f"{e.code}; its message is above). Rerun the same command to "
                         "continue once it is fixed.\n")
        return EXIT_USER_ERROR if e.code == EXIT_USER_ERROR else e.code
    except KeyboardInterrupt:
        sys.stderr.write("reproduce: interrupted; rerun the same command to continue.\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
