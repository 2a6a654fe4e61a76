"""Strip outputs from notebooks before committing them (the repository keeps them clean).

    python tools/strip_notebooks.py                 # every notebooks/*.ipynb, in place
    python tools/strip_notebooks.py a.ipynb b.ipynb
    python tools/strip_notebooks.py --check         # exit 1 if any notebook has outputs

Removes cell outputs, execution counts and the per-cell execution metadata that
Jupyter and Colab add; keeps cell ids, tags (the "parameters" tag) and the
notebook's kernelspec. tests/test_notebooks.py checks the committed notebooks are
clean.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CELL_META_DROP = ("execution", "collapsed", "scrolled", "outputId", "colab", "executionInfo")
_NB_META_DROP = ("widgets", "varInspector", "toc")


def is_clean(nb) -> bool:
    """Whether no code cell has outputs or an execution count."""
    return all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def strip(nb):
    """The notebook without outputs, execution counts and transient metadata (in place)."""
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
        for k in _CELL_META_DROP:
            c.metadata.pop(k, None)
    for k in _NB_META_DROP:
        nb.metadata.pop(k, None)
    return nb


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if any has outputs")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
    if not paths:
        print("No notebooks found.", file=sys.stderr)
        return 1
    dirty = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        if is_clean(nb) and args.check:
            continue
        if args.check:
            dirty.append(p)
            continue
        nbformat.validate(strip(nb))
        nbformat.write(nb, p)
        print("stripped", p)
    if dirty:
        print("Notebooks with outputs (run tools/strip_notebooks.py):\n  " + "\n  ".join(dirty),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
