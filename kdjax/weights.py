"""Torch-free weight loading: PyTorch checkpoints -> Flax variables.

* :func:`load_torch_checkpoint` reads PyTorch's zip checkpoint format (and the
  legacy pre-1.6 format) with a restricted unpickler: only tensor rebuild
  functions, storage types, ``collections.OrderedDict``, plain containers and
  (inert placeholders for) whitelisted ``torch.nn`` module classes are
  allowed; any other global raises :class:`UnsafeCheckpointError` before
  anything is called. torch is never imported.
* torchvision ResNets, the EfficientAD PDN teachers and the reference
  RD4AD/MRKD student checkpoints are mapped onto the Flax modules of
  ``kdjax.models`` (conv OIHW -> HWIO, BatchNorm weight/bias -> params
  scale/bias, running_mean/var -> batch_stats mean/var; METHODS.md "Shared
  parts"), with a shape check that names the first missing or mismatched key.
* :func:`load_teacher` resolves ``teacher.weights`` (INTERFACE.md): a .pth
  path, a ported ``.npz`` file, ``"auto"`` (cache, else download with sha256
  check, else a message saying what to download and where to put it), or
  ``"random"``.

Ported files are ``.npz`` archives of the flattened Flax variables
("params/conv1/kernel", ...) plus a JSON string "__kdjax_meta__"; they are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np

# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references a global that is not on the allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a (complete) PyTorch checkpoint."""


class WeightMismatchError(ValueError):
    """Checkpoint tensors do not fit the Flax module (missing key, wrong shape, extra key)."""


class WeightsUnavailableError(FileNotFoundError):
    """``auto`` weights are neither cached nor downloadable."""


# --------------------------------------------------------------------------
# Restricted unpickling of torch checkpoints
# --------------------------------------------------------------------------

try:  # ml_dtypes ships with jax
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover
    _BF16 = None

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _BF16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class _StorageType:
    """Placeholder for a torch storage class (only carries the numpy dtype)."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]) if _STORAGE_DTYPES[name] is not None else None

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage's raw bytes as a flat numpy array of its dtype."""

    def __init__(self, array: np.ndarray):
        self.array = array


class _ModuleStub:
    """Inert stand-in for a whitelisted torch.nn module class in whole-model pickles.

    Unpickling creates it with ``object.__new__`` and hands it its ``__dict__``
    (``_parameters``, ``_buffers``, ``_modules``, ...); no torch code runs.
    """

    torch_class = "?"

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Equivalent of torch._utils._rebuild_tensor_v2 on numpy: a strided view, copied."""
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor storage of unexpected type {type(storage).__name__}")
    arr = storage.array
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if any(s < 0 for s in size) or any(st < 0 for st in stride) or len(size) != len(stride):
        raise CheckpointFormatError(f"tensor with invalid size {size} / stride {stride}: the checkpoint "
                                    "is corrupt")
    n = int(np.prod(size)) if size else 1
    if n == 0:
        return np.zeros(size, arr.dtype)
    last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
    if storage_offset < 0 or last >= arr.size:
        raise CheckpointFormatError(
            f"tensor of size {size} stride {stride} offset {storage_offset} exceeds its storage "
            f"of {arr.size} elements: the checkpoint is corrupt")
    base = arr[storage_offset:]
    item = arr.dtype.itemsize
    out = np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(s * item for s in stride))
    return np.array(out, copy=True)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


def _rebuild_parameter_with_state(data, requires_grad=None, backward_hooks=None, state=None):
    return data


def _encode(obj, encoding="latin1"):  # _codecs.encode as used by protocol-2 bytes
    if not isinstance(obj, str):
        raise UnsafeCheckpointError("_codecs.encode called on a non-string")
    return obj.encode(encoding)


_NN_MODULE_CLASSES = {
    "torch.nn.modules.container": ["Sequential", "ModuleList", "ModuleDict"],
    "torch.nn.modules.conv": ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d"],
    "torch.nn.modules.activation": ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "ReLU6"],
    "torch.nn.modules.pooling": ["AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d"],
    "torch.nn.modules.batchnorm": ["BatchNorm1d", "BatchNorm2d"],
    "torch.nn.modules.linear": ["Linear", "Identity"],
    "torch.nn.modules.dropout": ["Dropout", "Dropout2d"],
    "torch.nn.modules.upsampling": ["Upsample"],
    "torch.nn.modules.flatten": ["Flatten"],
    "torch.nn.modules.normalization": ["LayerNorm", "GroupNorm"],
    "torchvision.models.resnet": ["ResNet", "BasicBlock", "Bottleneck"],
}


def _make_allowed() -> Dict[Tuple[str, str], Any]:
    allowed: Dict[Tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _encode,
    }
    for name in _STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
        allowed[("torch.cuda", name)] = _StorageType(name)  # legacy files saved from GPU tensors
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
    for mod in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("dict", dict), ("list", list),
                          ("tuple", tuple), ("int", int), ("float", float), ("bool", bool),
                          ("str", str), ("complex", complex), ("slice", slice), ("bytearray", bytearray)):
            allowed[(mod, name)] = obj
    for mod, names in _NN_MODULE_CLASSES.items():
        for name in names:
            allowed[(mod, name)] = type(name, (_ModuleStub,), {"torch_class": f"{mod}.{name}"})
    return allowed


_ALLOWED = _make_allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; persistent ids -> storages."""

    def __init__(self, file, load_storage: Callable[[tuple], Any], origin: str):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage
        self._origin = origin

    def find_class(self, module, name):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise UnsafeCheckpointError(
            f"{self._origin}: refused to load global '{module}.{name}': kdjax only reads tensors, "
            "containers and plain values from checkpoints (nothing in the file is executed). "
            "If you trust this file, re-save it as a plain state dict with torch: "
            "torch.save(torch.load(f, weights_only=False).state_dict(), 'plain.pth').")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"{self._origin}: unexpected persistent id {pid!r}")
        if pid[0] == "module":  # legacy whole-model source record; carries no data
            return None
        if pid[0] != "storage":
            raise CheckpointFormatError(f"{self._origin}: unexpected persistent id type {pid[0]!r}")
        return self._load_storage(pid)


def _storage_array(raw: bytes, stype: Any, origin: str, numel: Optional[int] = None) -> _Storage:
    if not isinstance(stype, _StorageType):
        raise CheckpointFormatError(f"{origin}: storage of unknown type {stype!r}")
    if stype.dtype is None:
        raise CheckpointFormatError(f"{origin}: {stype} needs the ml_dtypes package (installed with jax)")
    dt = stype.dtype.newbyteorder("<")
    if len(raw) % dt.itemsize:
        raise CheckpointFormatError(f"{origin}: storage size {len(raw)} bytes is not a multiple of "
                                    f"{dt.itemsize}; the file is truncated or corrupt: re-download it")
    arr = np.frombuffer(raw, dtype=dt)
    if numel is not None and arr.size < numel:
        raise CheckpointFormatError(f"{origin}: storage holds {arr.size} of {numel} elements; the file "
                                    "is truncated: re-download it")
    return _Storage(arr)


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_zip(path: str) -> Any:
    origin = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(
            f"{origin}: the zip archive of this PyTorch checkpoint is truncated or corrupt ({e}); "
            "re-download the file (compare its size/sha256 with the source).") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointFormatError(
                f"{origin}: a zip file but not a PyTorch checkpoint (no '<name>/data.pkl' record)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if byteorder != "little":
            raise CheckpointFormatError(f"{origin}: big-endian checkpoints are not supported")
        cache: Dict[str, _Storage] = {}

        def load_storage(pid):
            _, stype, key, _location, numel = pid[:5]
            if key not in cache:
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError as e:
                    raise CheckpointFormatError(
                        f"{origin}: record data/{key} is missing; the file is truncated or corrupt: "
                        "re-download it") from e
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                    raise CheckpointFormatError(
                        f"{origin}: record data/{key} cannot be read ({e}); the file is truncated or "
                        "corrupt: re-download it") from e
                typed = isinstance(stype, _StorageType) and stype.name != "UntypedStorage"
                cache[key] = _storage_array(raw, stype, origin, numel if typed else None)
            return cache[key]

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointFormatError(f"{origin}: cannot read data.pkl ({e}); re-download the file") from e
        return _RestrictedUnpickler(io.BytesIO(data), load_storage, origin).load()


def _load_legacy(path: str, f) -> Any:
    """Pre-1.6 format: magic, protocol, sys_info, data pickle, storage keys, raw storages."""
    origin = os.fspath(path)

    def plain_load():
        return _RestrictedUnpickler(f, lambda pid: None, origin).load()

    try:
        magic = plain_load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointFormatError(
            f"{origin}: not a PyTorch checkpoint (neither a zip archive nor the legacy pickle "
            f"format: {type(e).__name__}). Give a .pth file saved by torch.save, or a ported .npz.") from e
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{origin}: not a PyTorch checkpoint (a pickle without torch's magic number). "
            "Give a .pth file saved by torch.save, or a ported .npz.")
    try:
        plain_load()  # protocol version
        plain_load()  # sys info
        storages: Dict[str, Tuple[Any, int]] = {}
        pending: Dict[str, list] = {}

        def load_storage(pid):
            _, stype, key, _location, numel, view = (tuple(pid) + (None,))[:6]
            if view is not None:
                raise CheckpointFormatError(f"{origin}: legacy storage views are not supported")
            storages[key] = (stype, numel)
            return _LazyStorage(key, pending)

        result = _RestrictedUnpickler(f, load_storage, origin).load()
        keys = plain_load()
        arrays: Dict[str, _Storage] = {}
        for key in keys:
            if key not in storages:
                raise pickle.UnpicklingError(f"storage key {key!r} not referenced by the data")
            stype, numel = storages[key]
            if not isinstance(stype, _StorageType) or stype.dtype is None:
                raise CheckpointFormatError(f"{origin}: storage of unsupported type {stype!r}")
            hdr = f.read(8)
            if len(hdr) < 8:
                raise EOFError
            n = int(np.frombuffer(hdr, "<i8")[0])
            if n < 0:
                raise pickle.UnpicklingError(f"negative storage size {n}")
            raw = f.read(n * stype.dtype.itemsize)
            if len(raw) < n * stype.dtype.itemsize:
                raise EOFError
            arrays[key] = _storage_array(raw, stype, origin, numel)
    except (EOFError, pickle.UnpicklingError) as e:
        raise CheckpointFormatError(f"{origin}: the legacy-format checkpoint is truncated or corrupt "
                                    f"({type(e).__name__}); re-download it") from e
    # resolve lazy tensors
    for key, tensors in pending.items():
        if key not in arrays:
            raise CheckpointFormatError(f"{origin}: storage {key!r} has no data; the file is truncated or "
                                        "corrupt: re-download it")
        for holder in tensors:
            holder.resolve(arrays[key])
    return _resolve_lazy(result)


class _LazyStorage(_Storage):
    """Legacy format: storage data follows the pickle, so tensors are built afterwards."""

    def __init__(self, key, pending):
        self.key = key
        self.pending = pending


class _LazyTensor:
    def __init__(self, args):
        self.args = args
        self.value = None

    def resolve(self, storage):
        self.value = _rebuild_tensor(storage, *self.args[1:])


def _resolve_lazy(obj):
    if isinstance(obj, _LazyTensor):
        return obj.value
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _resolve_lazy(obj[k])
        return obj
    if isinstance(obj, list):
        return [_resolve_lazy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve_lazy(v) for v in obj)
    if isinstance(obj, _ModuleStub):
        obj.__dict__.update({k: _resolve_lazy(v) for k, v in obj.__dict__.items()})
        return obj
    return obj


def _rebuild_tensor_any(storage, *args):
    if isinstance(storage, _LazyStorage):
        t = _LazyTensor((storage,) + args)
        storage.pending.setdefault(storage.key, []).append(t)
        return t
    return _rebuild_tensor(storage, *args)


_ALLOWED[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor_any
_ALLOWED[("torch._utils", "_rebuild_tensor")] = _rebuild_tensor_any


def _module_state(stub: _ModuleStub, prefix: str, out: Dict[str, Any]):
    d = stub.__dict__
    nonpersistent = d.get("_non_persistent_buffers_set") or set()
    for name, value in (d.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (d.get("_buffers") or {}).items():
        if value is not None and name not in nonpersistent:
            out[prefix + name] = value
    for name, sub in (d.get("_modules") or {}).items():
        if isinstance(sub, _ModuleStub):
            _module_state(sub, f"{prefix}{name}.", out)


def _flatten(obj: Any, prefix: str, out: Dict[str, np.ndarray]):
    if isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
    elif isinstance(obj, _ModuleStub):
        sub: Dict[str, Any] = collections.OrderedDict()
        _module_state(obj, "", sub)
        for k, v in sub.items():
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if prefix == "" and isinstance(obj.get(wrapper), (dict, _ModuleStub)):
                _flatten(obj[wrapper], "", out)
                return
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    # other values (ints, strings, optimizer hyper-parameters, ...) carry no weights


def _to_float32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16 or (_BF16 is not None and a.dtype == _BF16):
        return a.astype(np.float32)
    return a


def load_torch_checkpoint(path) -> Dict[str, np.ndarray]:
    """Reads a PyTorch .pth/.pt checkpoint WITHOUT torch.

    Returns a flat ``{key: numpy array}`` dict: "state_dict"/"model" wrappers
    are unwrapped, nested dicts become dotted keys (the reference RD
    checkpoints {"bn": ..., "decoder": ...} -> "bn.xxx", "decoder.xxx"), a
    whole pickled ``nn.Module`` (whitelisted classes only) becomes its state
    dict; a DataParallel "module." prefix is stripped. float16/bfloat16 are
    converted to float32. Raises :class:`UnsafeCheckpointError` for any
    global not on the allow-list (nothing is executed) and
    :class:`CheckpointFormatError` for files that are not (complete)
    checkpoints.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == _ZIP_MAGIC or zipfile.is_zipfile(f):
            f.seek(0)
            obj = _load_zip(path)
        else:
            f.seek(0)
            obj = _load_legacy(path, f)
    out: Dict[str, np.ndarray] = collections.OrderedDict()
    _flatten(obj, "", out)
    if not out:
        raise CheckpointFormatError(f"{path}: the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in out):
        out = collections.OrderedDict((k[len("module."):], v) for k, v in out.items())
    return collections.OrderedDict((k, _to_float32(v)) for k, v in out.items())


# --------------------------------------------------------------------------
# torch state dict <-> Flax variables
# --------------------------------------------------------------------------

_INDEX_RE = re.compile(r"^(.*)_(\d+)$")
_GEN_CONV_RE = re.compile(r"^conv_(\d+)$")


def torch_module_path(flax_path: Iterable[str]) -> str:
    """Flax module path -> torch module path: ``layer1_0/downsample_0`` -> ``layer1.0.downsample.0``.

    A Generation module's ``conv_0``/``conv_2`` are the torch Sequential indices ``0``/``2``.
    """
    parts = []
    for p in flax_path:
        m = _GEN_CONV_RE.match(p)
        if m:
            parts.append(m.group(1))
            continue
        m = _INDEX_RE.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    return ".".join(parts)


def _pdn_module_path(flax_path: Iterable[str]) -> str:
    return ".".join(p[4:] if re.fullmatch(r"conv\d+", p) else p for p in flax_path)


_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def _flax_from_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO (ConvTranspose too, see models/rd.py)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _torch_shape(flax_shape: Tuple[int, ...], leaf: str) -> Tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def expected_torch_keys(template: Dict[str, Any], module_path_fn=torch_module_path,
                        prefix: str = "") -> "collections.OrderedDict[str, tuple]":
    """torch key -> (flax path tuple, torch-layout shape) for every leaf of a variables template."""
    from flax import traverse_util

    out = collections.OrderedDict()
    flat = traverse_util.flatten_dict(dict(template))
    # params first in module order, batch_stats beside them
    for path, leaf in flat.items():
        collection, *mod, name = path
        if (collection, name) not in _LEAF_TO_TORCH:
            raise ValueError(f"no torch equivalent for variable {'/'.join(path)}")
        key = prefix + module_path_fn(mod) + "." + _LEAF_TO_TORCH[(collection, name)]
        out[key] = (path, _torch_shape(tuple(leaf.shape), name))
    # natural order of the torch keys (layer2 before layer10), close to network order
    leaf_rank = {"weight": "0", "bias": "1", "running_mean": "2", "running_var": "3"}

    def natural(kv):
        mod, leaf = kv[0].rsplit(".", 1)
        parts = [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in mod.split(".")]
        return parts + [(2, 0, leaf_rank.get(leaf, leaf))]

    return collections.OrderedDict(sorted(out.items(), key=natural))


def state_dict_to_variables(state: Dict[str, np.ndarray], template: Dict[str, Any], what: str,
                            skip: Iterable[str] = (r"num_batches_tracked$",),
                            module_path_fn=torch_module_path, prefix: str = "",
                            hint: str = "") -> Dict[str, Any]:
    """Maps a torch state dict onto a Flax variables template (from ``jax.eval_shape(module.init, ...)``).

    Every template leaf must get a tensor of the matching shape and every
    checkpoint tensor not matching a ``skip`` pattern must be used; otherwise
    :class:`WeightMismatchError` names the first offending key and both shapes.
    """
    from flax import traverse_util

    expected = expected_torch_keys(template, module_path_fn, prefix)
    skip_re = [re.compile(s) for s in skip]
    flat_out = {}
    # shapes first, in the checkpoint's (network) order, so the first mismatch is named
    for key, arr in state.items():
        if key in expected and tuple(np.shape(arr)) != tuple(expected[key][1]):
            raise WeightMismatchError(
                f"{what}: tensor '{key}' has shape {tuple(np.shape(arr))} in the checkpoint but the "
                f"model expects {tuple(expected[key][1])} (torch layout). The checkpoint is probably "
                "of another architecture or width." + hint)
    for key, (path, shape) in expected.items():
        if key not in state:
            near = [k for k in state if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
            raise WeightMismatchError(
                f"{what}: tensor '{key}' (shape {shape}) is missing from the checkpoint"
                + (f"; the checkpoint has {near}" if near else
                   f"; the checkpoint's first keys are {list(state)[:4]}")
                + ". It is probably of another architecture or width." + hint)
        arr = np.asarray(state[key])
        if tuple(arr.shape) != tuple(shape):
            raise WeightMismatchError(
                f"{what}: tensor '{key}' has shape {tuple(arr.shape)} in the checkpoint but the "
                f"model expects {tuple(shape)} (torch layout). The checkpoint is probably of another "
                "architecture or width." + hint)
        flat_out[path] = np.asarray(_flax_from_torch(arr, path[-1]), dtype=np.float32)
    extra = [k for k in state if k not in expected and not any(r.search(k) for r in skip_re)]
    if extra:
        raise WeightMismatchError(
            f"{what}: the checkpoint has {len(extra)} tensor(s) the model does not use, first "
            f"'{extra[0]}' with shape {tuple(np.shape(state[extra[0]]))}. It is probably of another "
            "architecture." + hint)
    return traverse_util.unflatten_dict(flat_out)


def _template(module, *args, **kw) -> Dict[str, Any]:
    import jax

    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))
    return {k: v for k, v in variables.items()}


# --------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------

TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
}
DEFAULT_BASE_URL = "https://download.pytorch.org/models/"
PDN_FILES = {"pdn_small": "teacher_small.pth", "pdn_medium": "teacher_medium.pth"}
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


def _is_pdn(arch: str) -> bool:
    return arch in PDN_FILES


def make_teacher_module(arch: str, width_divisor: int = 1, dtype=None, **kw):
    """The Flax module of a teacher architecture (ResNet taps or PDN)."""
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    if _is_pdn(arch):
        from kdjax.models.pdn import PDN

        return PDN(size="S" if arch == "pdn_small" else "M", dtype=dtype,
                   width_divisor=width_divisor, **kw)
    from kdjax.models.resnet import ARCHS, make_resnet

    if arch not in ARCHS:
        raise ValueError(f"unknown teacher architecture {arch!r}; choose one of "
                         f"{sorted(ARCHS) + sorted(PDN_FILES)}")
    return make_resnet(arch, width_divisor=width_divisor, dtype=dtype, **kw)


def _teacher_template(arch: str, module) -> Dict[str, Any]:
    import jax.numpy as jnp

    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return _template(module, x)


def teacher_variables_from_state_dict(arch: str, state: Dict[str, np.ndarray], module,
                                      what: str = "") -> Dict[str, Any]:
    """torchvision / EfficientAD state dict -> Flax variables of ``module``."""
    template = _teacher_template(arch, module)
    what = what or arch
    if _is_pdn(arch):
        return state_dict_to_variables(state, template, what, module_path_fn=_pdn_module_path,
                                       hint=" A PDN checkpoint has keys '0.weight', '0.bias', '3.weight', ...")
    skip = [r"num_batches_tracked$"]
    if not getattr(module, "with_head", False):
        skip += [r"^fc\.", r"^layer4\."]
    return state_dict_to_variables(
        state, template, what, skip=skip,
        hint=f" Expected torchvision's {arch} (file {TORCHVISION_FILES.get(arch, '?')}).")


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


def random_variables(template: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Deterministic random variables for a template, drawn with numpy (no XLA compile).

    Conv/Dense kernels ~ N(0, 2 / fan_out) (torchvision's kaiming_normal
    fan_out), biases 0, BatchNorm scale 1, running mean 0 and var 1.
    """
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(template)).items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) > 2 else shape[-1]
            val = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out))
        elif name in ("scale", "var"):
            val = np.ones(shape, np.float32)
        else:
            val = np.zeros(shape, np.float32)
        out[path] = val
    return traverse_util.unflatten_dict(out)


def load_teacher_described(arch: str, source: str, width_divisor: int = 1, dtype=None,
                           progress: bool = True, **module_kw):
    """Like :func:`load_teacher` but returns (module, variables, description)."""
    module = make_teacher_module(arch, width_divisor, dtype, **module_kw)
    source = os.fspath(source)
    if source == "random":
        variables = random_variables(_teacher_template(arch, module), seed=0)
        return module, variables, describe_source(arch, source, width_divisor)
    if source == "auto":
        if width_divisor != 1:
            raise ValueError(f"width_divisor={width_divisor}: the pretrained {arch} weights are full "
                             "width; use width_divisor=1 or teacher.weights='random'")
        variables, desc = _resolve_auto(arch, progress)
        return module, variables, desc
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"teacher weights file {source!r} does not exist; give a torchvision .pth, a ported .npz "
            "(tools/port_weights.py), 'auto' or 'random'")
    if source.endswith(".npz"):
        variables, meta = load_ported(source, _teacher_template(arch, module), what=source)
        if meta.get("arch") not in (None, arch):
            raise WeightMismatchError(f"{source} was ported for {meta['arch']!r}, not {arch!r}")
        return module, variables, f"{arch} weights {meta.get('source', '')} (ported file {source})"
    if _is_pdn(arch):
        state = load_torch_checkpoint(source)
        variables = teacher_variables_from_state_dict(arch, state, module, what=f"{source} ({arch})")
        return module, variables, f"{arch} weights from {source}"
    variables, meta = port_torchvision(arch, source, width_divisor=width_divisor, module=module)
    return module, variables, f"{arch} weights from {source}" + (
        f" (sha256 {meta['sha256'][:12]}...)" if "sha256" in meta else "")


def load_teacher(arch: str, source: str, width_divisor: int = 1, dtype=None, **module_kw):
    """Teacher module and its variables (INTERFACE.md, ``teacher.weights``).

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
# Reference RD4AD / MRKD student checkpoints
# --------------------------------------------------------------------------


def rd_student_template(width_divisor: int = 1, generation: bool = False) -> Dict[str, Any]:
    import jax.numpy as jnp
    from kdjax.models.rd import RDStudent

    d = width_divisor
    feats = {"layer1": jnp.zeros((1, 16, 16, 256 // d)), "layer2": jnp.zeros((1, 8, 8, 512 // d)),
             "layer3": jnp.zeros((1, 4, 4, 1024 // d))}
    return _template(RDStudent(width_divisor, generation), feats)


def load_reference_rd_checkpoint(path, width_divisor: int = 1, generation: bool = False) -> Dict[str, Any]:
    """Imports a checkpoint saved by the reference RD4AD / MRKD training scripts.

    The file holds {"bn": OCBE state dict, "decoder": decoder state dict}
    (layouts in spec/reference_checkpoints/); returns {"params", "batch_stats"}
    for ``kdjax.models.rd.RDStudent(width_divisor, generation)``. Unused
    reference tensors (bn.conv4/bn4, MRKD's decoder.conv1,
    num_batches_tracked) are skipped; every other tensor must land on a Flax
    leaf and every leaf must get a tensor.
    """
    state = load_torch_checkpoint(path)
    has_gen = any(k.startswith("decoder.generation") for k in state)
    if has_gen and not generation:
        raise WeightMismatchError(f"{path}: an MRKD checkpoint (decoder.generation* tensors); load it "
                                  "with generation=True (method mrkd)")
    if generation and not has_gen:
        raise WeightMismatchError(f"{path}: tensor 'decoder.generation1.0.weight' is missing: an RD4AD "
                                  "checkpoint (no MRKD generation modules); load it with "
                                  "generation=False (method rd4ad)")
    template = rd_student_template(width_divisor, generation)
    skip = [r"num_batches_tracked$", r"^bn\.conv4\.", r"^bn\.bn4\.", r"^decoder\.conv1\.", r"^optim"]
    return state_dict_to_variables(
        state, template, f"{path} (RD student{' + generation' if generation else ''})", skip=skip,
        hint=" Expected a checkpoint of the reference RD4AD/MRKD code with keys 'bn.*' and 'decoder.*'.")


__all__ = [
    "UnsafeCheckpointError", "CheckpointFormatError", "WeightMismatchError", "WeightsUnavailableError",
    "load_torch_checkpoint", "state_dict_to_variables", "expected_torch_keys", "torch_module_path",
    "load_teacher", "load_teacher_described", "describe_source", "make_teacher_module",
    "teacher_variables_from_state_dict", "port_torchvision", "save_ported", "load_ported",
    "load_reference_rd_checkpoint", "rd_student_template", "cache_dir", "download",
    "TORCHVISION_FILES",
]
