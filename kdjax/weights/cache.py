"""Teacher weight files: the cache, downloads, sha256, ported .npz files, ``load_teacher``.

:func:`load_teacher` resolves ``teacher.weights`` (docs/INTERFACE.md): a .pth
path, a ported ``.npz`` file, ``"auto"`` (cache, else download with sha256
check, else a message saying what to download and where to put it), or
``"random"``.

Ported files are ``.npz`` archives of the flattened Flax variables
("params/conv1/kernel", ...) plus a JSON string "__kdjax_meta__"; they are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np

from kdjax.weights.errors import CheckpointFormatError, WeightMismatchError, WeightsUnavailableError
from kdjax.weights.mappings import (PDN_FILES, TORCHVISION_FILES, _is_pdn, _teacher_template,
                                    make_teacher_module, random_variables,
                                    teacher_variables_from_state_dict)
from kdjax.weights.torch_pickle import load_torch_checkpoint

DEFAULT_BASE_URL = "https://download.pytorch.org/models/"
PDN_URL = "https://github.com/nelson1425/EfficientAD/raw/main/models/"
CONNECT_TIMEOUT_S = 5.0


def cache_dir() -> str:
    """$KDJAX_CACHE, else ~/.cache/kdjax."""
    return os.environ.get("KDJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kdjax")


def download_base_url() -> str:
    """Base URL of the torchvision weights ($KDJAX_WEIGHTS_BASE_URL overrides, e.g. for a mirror)."""
    return os.environ.get("KDJAX_WEIGHTS_BASE_URL") or DEFAULT_BASE_URL


def _torch_hub_dir() -> str:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.path.join(home, "hub", "checkpoints")


def save_ported(path: str, variables: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Writes Flax variables as a ported .npz (flattened paths + JSON metadata; no pickle)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    arrays["__kdjax_meta__"] = np.array(json.dumps(meta))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=d)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_ported(path: str, template: Optional[Dict[str, Any]] = None,
                what: str = "") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Reads a ported .npz -> (variables, meta); checks it against ``template`` if given."""
    from flax import traverse_util

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__kdjax_meta__"])) if "__kdjax_meta__" in z.files else {}
            flat = {tuple(k.split("/")): np.asarray(z[k]) for k in z.files if k != "__kdjax_meta__"}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointFormatError(f"{path}: not a readable kdjax ported weights file ({e}); "
                                    "re-create it with tools/port_weights.py") from e
    if template is not None:
        tflat = traverse_util.flatten_dict(dict(template))
        for k, leaf in tflat.items():
            if k not in flat:
                raise WeightMismatchError(f"{what or path}: ported file lacks '{'/'.join(k)}' "
                                          f"(shape {tuple(leaf.shape)}); ported for arch "
                                          f"{meta.get('arch', '?')!r}, width_divisor "
                                          f"{meta.get('width_divisor', '?')}")
            if tuple(flat[k].shape) != tuple(leaf.shape):
                raise WeightMismatchError(f"{what or path}: '{'/'.join(k)}' has shape "
                                          f"{tuple(flat[k].shape)} in the ported file but the model "
                                          f"expects {tuple(leaf.shape)}; ported for arch "
                                          f"{meta.get('arch', '?')!r}")
        extra = [k for k in flat if k not in tflat]
        if extra:
            raise WeightMismatchError(f"{what or path}: ported file has unused '{'/'.join(extra[0])}'"
                                      f"; ported for arch {meta.get('arch', '?')!r}")
    return traverse_util.unflatten_dict(flat), meta


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _expected_sha_prefix(filename: str) -> Optional[str]:
    m = re.search(r"-([0-9a-f]{8,})\.pth$", filename)
    return m.group(1) if m else None


def download(url: str, dest: str, timeout: float = CONNECT_TIMEOUT_S, progress: bool = True) -> str:
    """Downloads ``url`` to ``dest`` (atomically) with a progress bar; returns dest.

    ``timeout`` bounds the connection and every read, so an unreachable host
    fails within seconds instead of hanging.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".part"
    t0 = time.time()
    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done = 0
        while True:
            block = r.read(1 << 20)
            if not block:
                break
            f.write(block)
            done += len(block)
            if progress:
                rate = done / max(time.time() - t0, 1e-6) / 2**20
                pct = f"{100 * done / total:5.1f}% of {total / 2**20:.0f} MiB" if total else f"{done / 2**20:.0f} MiB"
                print(f"\rdownloading {os.path.basename(dest)}: {pct} ({rate:.1f} MiB/s)",
                      end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if total and done != total:
        os.remove(tmp)
        raise CheckpointFormatError(f"download of {url} stopped after {done} of {total} bytes; retry")
    os.replace(tmp, dest)
    return dest


def port_torchvision(arch: str, src: str, out: Optional[str] = None, width_divisor: int = 1,
                     check_sha: bool = True, module=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """.pth file -> (Flax variables, meta); writes the ported .npz to ``out`` if given.

    Checks the sha256 prefix that torchvision file names carry (``name-<hex>.pth``).
    """
    module = make_teacher_module(arch, width_divisor) if module is None else module
    meta = {"arch": arch, "width_divisor": width_divisor, "source": os.path.basename(src)}
    expect = _expected_sha_prefix(os.path.basename(src))
    if check_sha and expect:
        digest = sha256_file(src)
        if not digest.startswith(expect):
            raise CheckpointFormatError(
                f"{src}: sha256 starts with {digest[:len(expect)]} but the file name says {expect}; "
                "the file is corrupt or incomplete: re-download it")
        meta["sha256"] = digest
    state = load_torch_checkpoint(src)
    variables = teacher_variables_from_state_dict(arch, state, module, what=f"{src} ({arch})")
    if out:
        save_ported(out, variables, meta)
    return variables, meta


def _ported_name(arch: str) -> str:
    fname = TORCHVISION_FILES.get(arch) or PDN_FILES[arch]
    return fname[: -len(".pth")] + ".kdjax.npz"


def _auto_source(arch: str) -> Tuple[str, str]:
    """("ported"|"pth"|"missing", path) for ``auto``."""
    cdir = cache_dir()
    ported = os.path.join(cdir, _ported_name(arch))
    if os.path.isfile(ported):
        return "ported", ported
    fname = TORCHVISION_FILES.get(arch) or PDN_FILES[arch]
    for d in (cdir, _torch_hub_dir()):
        p = os.path.join(d, fname)
        if os.path.isfile(p):
            return "pth", p
    return "missing", os.path.join(cdir, fname)


def describe_source(arch: str, source: str, width_divisor: int = 1) -> str:
    """One line saying what ``load_teacher(arch, source)`` loads (for logs and results.json)."""
    if source == "random":
        return (f"{arch} (width/{width_divisor}) with RANDOM weights (fixed seed 0): not pretrained, "
                "numbers are not comparable with published results")
    if source == "auto":
        kind, path = _auto_source(arch)
        fname = TORCHVISION_FILES.get(arch) or PDN_FILES.get(arch)
        if kind == "missing":
            return f"{arch} pretrained weights {fname} (auto: not cached yet, will download)"
        return f"{arch} pretrained weights {fname} (auto: {path})"
    return f"{arch} weights from {os.path.abspath(source)}"


def _offline_message(arch: str, url: str, err: Exception) -> str:
    fname = TORCHVISION_FILES.get(arch) or PDN_FILES[arch]
    cdir = cache_dir()
    return (
        f"teacher weights for {arch} are not cached and could not be downloaded from {url} "
        f"({type(err).__name__}: {err}). On a machine with network access download {fname} from "
        f"{url} and either put it at {os.path.join(cdir, fname)} (the cache: $KDJAX_CACHE or "
        f"~/.cache/kdjax), or run `python tools/port_weights.py --arch {arch} --src {fname} "
        f"--out {os.path.join(cdir, _ported_name(arch))}`, or set teacher.weights=<path to {fname}>.")


def _resolve_auto(arch: str, progress: bool = True) -> Tuple[Dict[str, Any], str]:
    kind, path = _auto_source(arch)
    module = make_teacher_module(arch)
    if kind == "ported":
        variables, meta = load_ported(path, _teacher_template(arch, module), what=path)
        return variables, f"{arch} pretrained weights {meta.get('source', '')} (ported cache {path})"
    if kind == "missing":
        fname = os.path.basename(path)
        if _is_pdn(arch):
            url = PDN_URL + fname
            raise WeightsUnavailableError(_offline_message(arch, url, FileNotFoundError(
                "the PDN teachers are not downloaded automatically")))
        url = download_base_url().rstrip("/") + "/" + fname
        tmpdir = tempfile.mkdtemp(prefix="kdjax-dl-")
        try:
            try:
                pth = download(url, os.path.join(tmpdir, fname), progress=progress)
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
                raise WeightsUnavailableError(_offline_message(arch, url, e)) from e
            ported = os.path.join(cache_dir(), _ported_name(arch))
            variables, meta = port_torchvision(arch, pth, out=ported)
        finally:
            for f in os.listdir(tmpdir):
                os.remove(os.path.join(tmpdir, f))
            os.rmdir(tmpdir)
        return variables, f"{arch} pretrained weights {fname} (downloaded from {url}, cached {ported})"
    ported = os.path.join(cache_dir(), _ported_name(arch))
    if _is_pdn(arch):
        variables = teacher_variables_from_state_dict(arch, load_torch_checkpoint(path), module)
        save_ported(ported, variables, {"arch": arch, "width_divisor": 1, "source": os.path.basename(path)})
    else:
        variables, _ = port_torchvision(arch, path, out=ported)
    return variables, f"{arch} pretrained weights from {path} (ported to {ported})"



def teacher_variables(arch: str, source: str, module, width_divisor: int = 1,
                      progress: bool = True) -> Tuple[Dict[str, Any], str]:
    """(variables, description) of the teacher ``module`` (of architecture ``arch``,
    widths divided by ``width_divisor``) from ``source``: a torchvision / PDN .pth, a
    ported .npz, "auto" (cached port, else download) or "random" (fixed seed 0)."""
    source = os.fspath(source)
    if source == "random":
        variables = random_variables(_teacher_template(arch, module), seed=0)
        return variables, describe_source(arch, source, width_divisor)
    if source == "auto":
        if width_divisor != 1:
            raise ValueError(f"width_divisor={width_divisor}: the pretrained {arch} weights are full "
                             "width; use width_divisor=1 or teacher.weights='random'")
        return _resolve_auto(arch, progress)
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"teacher weights file {source!r} does not exist; give a torchvision .pth, a ported .npz "
            "(tools/port_weights.py), 'auto' or 'random'")
    if source.endswith(".npz"):
        variables, meta = load_ported(source, _teacher_template(arch, module), what=source)
        if meta.get("arch") not in (None, arch):
            raise WeightMismatchError(f"{source} was ported for {meta['arch']!r}, not {arch!r}")
        return variables, f"{arch} weights {meta.get('source', '')} (ported file {source})"
    if _is_pdn(arch):
        state = load_torch_checkpoint(source)
        variables = teacher_variables_from_state_dict(arch, state, module, what=f"{source} ({arch})")
        return variables, f"{arch} weights from {source}"
    variables, meta = port_torchvision(arch, source, width_divisor=width_divisor, module=module)
    return variables, f"{arch} weights from {source}" + (
        f" (sha256 {meta['sha256'][:12]}...)" if "sha256" in meta else "")


def load_teacher_described(arch: str, source: str, width_divisor: int = 1, dtype=None,
                           progress: bool = True, **module_kw):
    """Like :func:`load_teacher` but returns (module, variables, description)."""
    module = make_teacher_module(arch, width_divisor, dtype, **module_kw)
    variables, desc = teacher_variables(arch, source, module, width_divisor, progress)
    return module, variables, desc


def load_teacher(arch: str, source: str, width_divisor: int = 1, dtype=None, **module_kw):
    """Teacher module and its variables (docs/INTERFACE.md, ``teacher.weights``).

    Args:
      arch: "resnet18", "resnet34", "resnet50", "wide_resnet50_2",
        "wide_resnet101_2", "pdn_small" or "pdn_medium".
      source: a torch .pth path, a ported .npz, "auto" or "random".
      width_divisor: divides all widths (random weights only).
      dtype: compute dtype (params stay float32).
    Returns:
      (module, variables); ``module.apply(variables, x)`` on NHWC
      ImageNet-normalized images gives {"layer1","layer2","layer3"} (ResNets)
      or the PDN output map. :func:`describe_source` says what was loaded.
    """
    module, variables, _ = load_teacher_described(arch, source, width_divisor, dtype, **module_kw)
    return module, variables



# --------------------------------------------------------------------------
# Provenance: which teacher file a model was trained with
# --------------------------------------------------------------------------


def teacher_provenance(arch: str, source: str, width_divisor: int = 1) -> Dict[str, Any]:
    """What ``load_teacher(arch, source, width_divisor)`` loads, to record beside a trained model.

    Returns ``{"arch", "source", "file", "sha256", "width_divisor"}``:
    ``source`` as given (a path, "auto" or "random"); ``file`` the absolute
    path of the file loaded (the .pth/.npz given, or the cached file "auto"
    resolves to) and ``sha256`` its hex digest, both None for "random" and
    for "auto" with nothing cached. Downloads nothing: call it after
    :func:`load_teacher`, when "auto" has put its port in the cache.
    :func:`check_provenance` verifies a record later.
    """
    source = os.fspath(source)
    record: Dict[str, Any] = {"arch": arch, "source": source, "file": None, "sha256": None,
                              "width_divisor": int(width_divisor)}
    if source == "random":
        return record
    if source == "auto":
        if arch not in TORCHVISION_FILES and arch not in PDN_FILES:
            raise ValueError(f"unknown teacher architecture {arch!r} for teacher.weights='auto'; choose "
                             f"one of {sorted(TORCHVISION_FILES) + sorted(PDN_FILES)}")
        kind, path = _auto_source(arch)
        if kind == "missing":
            return record
    else:
        path = source
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"teacher weights file {source!r} does not exist; give a torchvision .pth, a ported .npz "
                "(tools/port_weights.py), 'auto' or 'random'")
    record["file"] = os.path.abspath(path)
    record["sha256"] = sha256_file(record["file"])
    return record


def check_provenance(recorded: Dict[str, Any]) -> None:
    """Raises ValueError when the teacher file of a :func:`teacher_provenance` record changed.

    The file is missing, or its sha256 is no longer the recorded one: the
    message (one line) names the file, both digests and the fix. Records
    without a file (random weights, "auto" before anything was cached) pass.
    """
    if not isinstance(recorded, dict):
        raise ValueError(f"a teacher provenance record is a dict (from teacher_provenance), not "
                         f"{type(recorded).__name__}")
    path, want = recorded.get("file"), recorded.get("sha256")
    if not path:
        return
    if not os.path.isfile(path):
        raise ValueError(f"the teacher weights file {path} this model was trained with (sha256 {want}) "
                         f"is missing: restore {path} or retrain")
    if not want:
        return
    got = sha256_file(path)
    if got != want:
        raise ValueError(f"{path}: sha256 is {got} but this model was trained with sha256 {want}: the "
                         f"teacher weights changed since this model was trained: restore {path} or "
                         "retrain")
