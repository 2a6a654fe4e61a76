"""The Colab/Jupyter notebooks in notebooks/: committed without outputs, and each one
runs top to bottom (nbclient, CPU, no network, no pip) on tiny settings injected
after its "parameters" cell, papermill style.

The kernel is a temporary "python3" kernelspec for this interpreter (found first
through JUPYTER_PATH), so nothing has to be registered and nothing is downloaded.
"""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ("quickstart", "own_data", "reproduce_paper")
CELL_TIMEOUT_S = 300

# Tiny settings: a random teacher at 1/16 width, 32 px images, a handful of images, 4 steps.
TINY = {
    "quickstart": dict(STEPS=4, BATCH_SIZE=4, IMAGE_SIZE=32, SYNTHETIC_SIZE=64,
                       SYNTHETIC_COUNTS=(8, 4, 4, 4, 4), SMOKE_TEST=True),
    # 5 drawn + 5 augmented images, 8 of them for training: the same shapes as the quickstart,
    # so its compiled functions come from the shared compilation cache.
    "own_data": dict(STAND_IN_COUNTS=(5, 2, 2), STAND_IN_SIZE=64, STEPS=4, BATCH_SIZE=4,
                     IMAGE_SIZE=32, VAL_FRACTION=0.2, AUGMENT_COPIES=1, SMOKE_TEST=True),
    "reproduce_paper": dict(STEPS=4, SMOKE_TEST=True, SMOKE_IMAGE_SIZE=32,
                            SMOKE_COUNTS=(8, 4, 4, 4, 4)),
}


def _read(name):
    return nbformat.read(os.path.join(NB_DIR, name + ".ipynb"), as_version=4)


def _inject(nb, params):
    """Insert an "injected-parameters" cell right after the cell tagged "parameters"."""
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(idx) == 1, "exactly one cell must be tagged 'parameters'"
    src = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell["id"] = "injected-parameters"
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A python3 kernelspec for sys.executable, CPU-only JAX, an empty weights cache, and
    one persistent XLA compilation cache shared by the notebooks' kernels (the notebooks
    compile the same tiny models; this saves most of the compile time)."""
    base = tmp_path_factory.mktemp("jupyter")
    spec_dir = base / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kdjax tests)", "language": "python"}))
    cache = base / "kdjax_cache"
    cache.mkdir()
    # Stand-ins for pip and git that only leave a mark: the install cell must skip them.
    fake_bin = base / "bin"
    fake_bin.mkdir()
    for tool in ("pip", "pip3", "git"):
        f = fake_bin / tool
        f.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{base}/installer_called"\nexit 1\n')
        f.chmod(0o755)
    env = {
        "JUPYTER_PATH": str(base) + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "KDJAX_CACHE": str(cache),  # no ported weights: the notebooks must not find any
        "KDJAX_WEIGHTS_BASE_URL": "http://127.0.0.1:9/",  # any download attempt fails at once
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PATH": str(fake_bin) + os.pathsep + os.environ.get("PATH", ""),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    assert not (base / "installer_called").exists(), (
        "a notebook ran pip or git: " + (base / "installer_called").read_text())


def _execute(name, params, cwd):
    nb = _inject(_read(name), params)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError (with the traceback) on any error
    return nb


def _text(nb):
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o:
                out.append(o["data"].get("text/plain", ""))
                out.append(o["data"].get("text/markdown", ""))
    return "".join(out)


def _n_images(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [], f"{name}: cell {c.get('id')} has outputs: strip them"
            assert c.execution_count is None, f"{name}: cell {c.get('id')} has an execution count"
    assert nb.cells[0].cell_type == "markdown" and "colab.research.google.com" in nb.cells[0].source
    install = nb.cells[1].source
    assert nb.cells[1].cell_type == "code" and 'find_spec("kdjax") is None' in install
    assert "REPO_URL" in install and "pip install" in install
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMOKE_TEST" in tagged[0].source
    for key in TINY[name]:
        assert f"\n{key} = " in "\n" + tagged[0].source, f"{name}: parameter {key} missing"


_SIMULATE_INSTALL = r"""
import importlib.util, json, re, sys
from importlib import metadata
src = open(sys.argv[1]).read()
shell = []  # IPython's "!cmd" lines: recorded, not run
src = re.sub(r"^(\s*)!(.*)$",
             lambda m: m.group(1) + "shell.append(f" + repr(m.group(2).strip()) + ")",
             src, flags=re.M)
real_spec, real_version = importlib.util.find_spec, metadata.version
hidden = set(json.loads(sys.argv[2]))  # distributions to treat as not installed
def find_spec(name, *a, **k):  # kdjax is not installed: the cell must find the copy
    return None if name == "kdjax" and "kdjax" not in sys.modules else real_spec(name, *a, **k)
def version(dist):
    if dist in hidden:
        raise metadata.PackageNotFoundError(dist)
    return real_version(dist)
importlib.util.find_spec, metadata.version = find_spec, version
ns = {"shell": shell, "__name__": "__main__"}
exec(compile(src, "install cell", "exec"), ns)
print(json.dumps({"kdjax": ns["kdjax"].__file__, "KDJAX_DIR": ns["KDJAX_DIR"], "shell": shell}))
"""


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_finds_an_uploaded_copy(name, tmp_path):
    """The install cell with kdjax not installed, run where a zip of the repository was
    uploaded (as on Colab): it unzips and uses that copy without any edit, keeps the
    runtime's jax, and pip-installs only the missing dependencies (pip is not run here)."""
    import subprocess
    import zipfile

    with zipfile.ZipFile(tmp_path / "kdjax-main.zip", "w") as z:
        for rel in ("pyproject.toml", "kdjax/__init__.py", "configs/demo.py"):
            z.write(os.path.join(REPO, rel), "kdjax-main/" + rel)
    cell = tmp_path / "cell.py"
    cell.write_text(_read(name).cells[1].source)
    script = tmp_path / "simulate.py"
    script.write_text(_SIMULATE_INSTALL)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, str(script), str(cell), json.dumps(["ml-collections"])],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    copy = str(tmp_path / "kdjax-main" / "kdjax-main")
    assert out["KDJAX_DIR"] == copy and out["kdjax"].startswith(copy)
    (pip,) = out["shell"]
    assert pip.startswith("pip install") and '"ml-collections' in pip
    assert "jax[" not in pip and "-c " in pip  # the runtime's jax is kept (pinned)
    assert "Keeping this runtime's jax" in p.stdout


def test_quickstart_runs(kernel_env, tmp_path):
    workdir = tmp_path / "run"
    nb = _execute("quickstart", dict(TINY["quickstart"], WORKDIR=str(workdir)), tmp_path)
    assert (workdir / "results.md").exists() and (workdir / "results.json").exists()
    text = _text(nb)
    assert "SMOKE TEST" in text and "# Results:" in text
    assert _n_images(nb) >= 3  # the data, the anomaly maps and the saved figures


def test_own_data_runs(kernel_env, tmp_path):
    workdir = tmp_path / "run"
    params = dict(TINY["own_data"], WORKDIR=str(workdir), DATA_ROOT=str(tmp_path / "my_images"))
    nb = _execute("own_data", params, tmp_path)
    assert (tmp_path / "my_images" / "my_part" / "ground_truth" / "scratch" / "000_mask.png").exists()
    assert (workdir / "augmented_data" / "my_part" / "train" / "good").is_dir()
    text = _text(nb)
    assert "STAND-IN" in text and "threshold" in text and "F1-max" in text
    assert _n_images(nb) >= 2


def test_reproduce_paper_smoke_runs(kernel_env, tmp_path):
    workdir = tmp_path / "run"
    nb = _execute("reproduce_paper", dict(TINY["reproduce_paper"], WORKDIR=str(workdir)), tmp_path)
    text = _text(nb)
    assert "RANDOM teacher" in text and "Ready to train." in text and "# Results:" in text
    assert (workdir / "results.md").exists()


def test_reproduce_paper_stops_cleanly_without_weights_and_data(kernel_env, tmp_path):
    params = dict(SMOKE_TEST=False, DOWNLOAD_WEIGHTS=False, WEIGHTS_PTH="",
                  DATA_ROOT=str(tmp_path / "no_such_dataset"), WORKDIR=str(tmp_path / "run"))
    nb = _execute("reproduce_paper", params, tmp_path)
    text = _text(nb)
    assert "teacher weights are not available" in text and "tools/port_weights.py" in text
    assert "mvtec.com" in text and "Not ready" in text
    assert not (tmp_path / "run").exists()  # nothing was trained
