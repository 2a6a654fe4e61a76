"""Torch-free weight loading: PyTorch checkpoints -> Flax variables.

* :func:`load_torch_checkpoint` (``torch_pickle``) reads PyTorch's zip
  checkpoint format (and the legacy pre-1.6 format) with a restricted
  unpickler: only tensor rebuild functions, storage types,
  ``collections.OrderedDict``, plain containers and (inert placeholders for)
  whitelisted ``torch.nn`` module classes are allowed; any other global raises
  :class:`UnsafeCheckpointError` before anything is called. torch is never
  imported.
* ``mappings``: torchvision ResNets, the EfficientAD PDN teachers, the
  reference RD4AD/MRKD student checkpoints and the reference EfficientAD
  teacher/student/autoencoder are mapped onto the Flax modules of
  ``kdjax.models`` (conv OIHW -> HWIO, BatchNorm weight/bias -> params
  scale/bias, running_mean/var -> batch_stats mean/var; docs/METHODS.md "Shared
  parts"), with a shape check that names the first missing or mismatched key.
* ``cache``: :func:`load_teacher` resolves ``teacher.weights``
  (docs/INTERFACE.md): a .pth path, a ported ``.npz`` file, ``"auto"`` (cache,
  else download with sha256 check, else a message saying what to download
  and where to put it), or ``"random"``; :func:`teacher_provenance` /
  :func:`check_provenance` record and verify which file a model was trained
  with.

Ported files are ``.npz`` archives of the flattened Flax variables
("params/conv1/kernel", ...) plus a JSON string "__kdjax_meta__"; they are
read with ``allow_pickle=False``.

Every name is re-exported here (``from kdjax import weights; weights.X``).
The functions of ``cache`` call each other inside that module: to replace
one in a test, patch it there (``kdjax.weights.cache.download``).
"""

from kdjax.weights.errors import (CheckpointFormatError, UnsafeCheckpointError,  # noqa: F401
                                  WeightMismatchError, WeightsUnavailableError)
from kdjax.weights.torch_pickle import load_torch_checkpoint  # noqa: F401
from kdjax.weights.mappings import (  # noqa: F401
    EFFICIENTAD_FILES, EFFICIENTAD_IMAGE_SIZE, PDN_FILES, TORCHVISION_FILES, _is_pdn,
    _pdn_module_path, _teacher_template, _template, efficientad_modules,
    efficientad_reference_file, expected_torch_keys,
    load_reference_efficientad, load_reference_rd_checkpoint, make_teacher_module,
    random_variables, rd_student_template, state_dict_to_variables, teacher_variables_from_state_dict,
    torch_module_path)
from kdjax.weights.cache import (  # noqa: F401
    CONNECT_TIMEOUT_S, DEFAULT_BASE_URL, PDN_URL, _auto_source, _expected_sha_prefix,
    _offline_message, _ported_name, _resolve_auto, _torch_hub_dir, cache_dir, check_provenance,
    describe_source, download, download_base_url, load_ported, load_teacher, load_teacher_described,
    port_torchvision, save_ported, sha256_file, teacher_provenance, teacher_variables)

__all__ = [
    "UnsafeCheckpointError", "CheckpointFormatError", "WeightMismatchError", "WeightsUnavailableError",
    "load_torch_checkpoint", "state_dict_to_variables", "expected_torch_keys", "torch_module_path",
    "load_teacher", "load_teacher_described", "describe_source", "make_teacher_module",
    "teacher_variables_from_state_dict", "port_torchvision", "save_ported", "load_ported",
    "load_reference_rd_checkpoint", "rd_student_template", "cache_dir", "download",
    "TORCHVISION_FILES", "teacher_provenance", "check_provenance", "load_reference_efficientad",
    "efficientad_modules", "efficientad_reference_file", "teacher_variables",
]
