"""Restricted reader of PyTorch checkpoints (zip format and the legacy pre-1.6 format).

:func:`load_torch_checkpoint` unpickles with an allow-list: only tensor
rebuild functions, storage types, ``collections.OrderedDict``, plain
containers and (inert placeholders for) whitelisted ``torch.nn`` module
classes are resolved; any other global raises :class:`UnsafeCheckpointError`
before anything is called. torch is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from kdjax.weights.errors import CheckpointFormatError, UnsafeCheckpointError


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
