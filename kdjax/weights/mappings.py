"""torch state dicts -> Flax variables of kdjax's modules.

torchvision ResNets, the EfficientAD PDN teachers, the reference
RD4AD/MRKD student checkpoints and the reference EfficientAD teacher,
student and autoencoder (:func:`load_reference_efficientad`) are mapped
onto the Flax modules of ``kdjax.models`` (conv OIHW -> HWIO, BatchNorm
weight/bias -> params scale/bias, running_mean/var -> batch_stats
mean/var; docs/METHODS.md "Shared parts"), with a shape check that names the
first missing or mismatched key.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Dict, Iterable, Tuple

import numpy as np

from kdjax.weights.errors import WeightMismatchError
from kdjax.weights.torch_pickle import load_torch_checkpoint

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
PDN_FILES = {"pdn_small": "teacher_small.pth", "pdn_medium": "teacher_medium.pth"}


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
    (layouts in docs/reference_checkpoints.md); returns {"params", "batch_stats"}
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



# --------------------------------------------------------------------------
# Reference EfficientAD (nelson1425/EfficientAD) teacher / student / autoencoder
# --------------------------------------------------------------------------

# roles -> file names tried in order: the state dicts the import asks for, then the
# whole pickled modules the reference efficientad.py writes (torch.save(teacher), ...)
EFFICIENTAD_FILES = {"teacher": ("teacher.pth", "teacher_final.pth"),
                     "student": ("student.pth", "student_final.pth"),
                     "ae": ("autoencoder.pth", "autoencoder_final.pth")}
# the reference autoencoder's code convolution has a fixed 8x8 kernel: 256x256 inputs
EFFICIENTAD_IMAGE_SIZE = 256


def efficientad_modules(model_size: str = "S", out_channels: int = 384, channels_divisor: int = 1,
                        image_size: int = EFFICIENTAD_IMAGE_SIZE, **module_kw) -> Dict[str, Any]:
    """{"teacher", "student", "ae"}: the Flax modules kdjax's EfficientAD builds for these sizes.

    ``PDN(size, c)``, ``PDN(size, 2 c)`` and ``Autoencoder(c, pdn_output_size(image_size, size))``
    with ``c = out_channels // channels_divisor`` and every hidden width divided by
    ``channels_divisor`` (kdjax.methods.efficientad).
    """
    from kdjax.models.pdn import PDN, Autoencoder, pdn_output_size

    size = str(model_size).upper()
    if size not in ("S", "M"):
        raise ValueError(f"model_size={model_size!r}: use 'S' (EfficientAD-S) or 'M' (EfficientAD-M)")
    d = int(channels_divisor)
    if d < 1 or int(out_channels) % d:
        raise ValueError(f"channels_divisor={channels_divisor} must be >= 1 and divide "
                         f"out_channels={out_channels}")
    c = int(out_channels) // d
    return {"teacher": PDN(size, c, width_divisor=d, **module_kw),
            "student": PDN(size, 2 * c, width_divisor=d, **module_kw),
            "ae": Autoencoder(c, pdn_output_size(image_size, size), width_divisor=d, **module_kw)}


def efficientad_reference_file(path, role: str) -> str:
    """The file of the reference EfficientAD ``role`` ("teacher", "student" or "ae") in
    the directory ``path`` (``teacher.pth`` or ``teacher_final.pth`` etc.); a
    ValueError naming the expected file when there is none."""
    path = os.fspath(path)
    names = EFFICIENTAD_FILES[role]
    for n in names:
        if os.path.isfile(os.path.join(path, n)):
            return os.path.join(path, n)
    raise ValueError(f"{os.path.join(path, names[0])} is missing: the reference EfficientAD "
                     f"{role} (torch.save(model.state_dict())) is expected there")


def load_reference_efficientad(path, model_size: str = "S", out_channels: int = 384,
                               channels_divisor: int = 1) -> Dict[str, Any]:
    """Imports the teacher, student and autoencoder trained by the reference EfficientAD code.

    ``path`` is a directory holding ``teacher.pth``, ``student.pth`` and
    ``autoencoder.pth``, each ``torch.save(model.state_dict())`` of
    nelson1425/EfficientAD's ``get_pdn_small``/``get_pdn_medium(out_channels)``,
    ``get_pdn_*(2 * out_channels)`` and ``get_autoencoder(out_channels)``
    (whole pickled modules, and the names ``teacher_final.pth``,
    ``student_final.pth``, ``autoencoder_final.pth`` its efficientad.py
    writes, are read too). torch is not needed.

    Returns ``{"teacher": {"params"}, "student": {"params"}, "ae": {"params"}}``
    (numpy float32) for the modules of :func:`efficientad_modules` (those of
    ``kdjax.methods.efficientad`` at ``out_channels // channels_divisor``
    output channels and a 256x256 input, the size the reference autoencoder
    is built for). A missing file or a tensor of another shape raises a
    ValueError naming the file and what was expected.
    """
    import jax.numpy as jnp

    path = os.fspath(path)
    modules = efficientad_modules(model_size, out_channels, channels_divisor)
    size = str(model_size).upper()
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory; expected a directory holding teacher.pth, "
                         "student.pth and autoencoder.pth (torch.save(model.state_dict()) of the "
                         "reference EfficientAD)")
    c = int(out_channels) // int(channels_divisor)
    ref = "get_pdn_small" if size == "S" else "get_pdn_medium"
    expect = {"teacher": f"{ref}({c}) with hidden widths / {channels_divisor}",
              "student": f"{ref}({2 * c}) with hidden widths / {channels_divisor}",
              "ae": f"get_autoencoder({c}) with widths / {channels_divisor}"}
    out = {}
    for role in EFFICIENTAD_FILES:
        try:
            file = efficientad_reference_file(path, role)
        except ValueError as e:
            raise ValueError(f"{e} (state dict of {expect[role]})") from None
        side = EFFICIENTAD_IMAGE_SIZE if role == "ae" else 64
        template = _template(modules[role], jnp.zeros((1, side, side, 3), jnp.float32))
        variables = state_dict_to_variables(
            load_torch_checkpoint(file), template, f"{file} (EfficientAD-{size} {role})",
            module_path_fn=_pdn_module_path,
            hint=f" Expected the reference {expect[role]} (model_size={size!r}, "
                 f"out_channels={out_channels}, channels_divisor={channels_divisor}).")
        out[role] = {"params": variables["params"]}
    return out
