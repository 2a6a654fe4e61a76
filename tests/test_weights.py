"""Torch-free checkpoint reading and teacher loading (kdjax.weights, kdjax.models.resnet).

Golden files in tests/golden/ come from tools/make_golden.py (torch venv):
reduced-width torchvision nets with the real block classes and key names,
random weights, non-trivial BatchNorm statistics, and torch's outputs.
Parity criterion: max |jax - torch| / max |torch| <= 1e-4 per tap.
"""

import os
import pickle
import shutil
import socket
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import weights as W
from kdjax.models.resnet import make_resnet, tap_channels

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TOL = 1e-4

RESNETS = {
    # golden name: (arch, width_divisor, stage_sizes)
    "resnet18_d16": ("resnet18", 16, (2, 2, 2, 2)),
    "resnet18_d16_legacy": ("resnet18", 16, (2, 2, 2, 2)),
    "resnet50_d16": ("resnet50", 16, (2, 1, 1, 1)),
    "wide_resnet50_2_d16": ("wide_resnet50_2", 16, (1, 2, 1, 1)),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def g(name):
    return os.path.join(GOLDEN, name)


# ----------------------------------------------------------------- parity


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_parity_with_torchvision(name):
    arch, d, stages = RESNETS[name]
    state = W.load_torch_checkpoint(g(name + ".pth"))
    module = make_resnet(arch, d, stage_sizes=stages, with_head=True, num_classes=10)
    variables = W.teacher_variables_from_state_dict(arch, state, module)
    ref = np.load(g(name.replace("_legacy", "") + ".npz"))
    out = jax.jit(module.apply)(variables, ref["x"])
    for tap in ("layer1", "layer2", "layer3", "layer4", "logits"):
        assert out[tap].shape == ref[tap].shape, tap
        err = rel_err(out[tap], ref[tap])
        print(f"{name} {tap}: max rel deviation {err:.2e}")
        assert err <= TOL, (name, tap, err)


@pytest.mark.parametrize("name,arch,d", [("pdn_s_d8", "pdn_small", 8), ("pdn_m_d16", "pdn_medium", 16),
                                         ("pdn_s_d8_whole", "pdn_small", 8)])
def test_pdn_parity(name, arch, d):
    """EfficientAD PDN teachers; *_whole is a pickled nn.Sequential (torch.save(model))."""
    ref = np.load(g("pdn.npz"))
    module, variables = W.load_teacher(arch, g(name + ".pth"), width_divisor=d, out_channels=24)
    out = jax.jit(module.apply)(variables, ref["x"])
    err = rel_err(out, ref[name.replace("_whole", "")])
    print(f"{name}: max rel deviation {err:.2e}")
    assert err <= TOL


def test_tensor_details_dtypes_strides_offsets_nesting():
    sd = W.load_torch_checkpoint(g("misc.pth"))
    ref = np.load(g("misc.npz"))
    assert set(sd) == {"half", "bf16", "scalar", "transposed", "offset", "long", "nested.a"}
    for k in ref.files:
        got = sd[k.replace("nested_a", "nested.a")]
        np.testing.assert_array_equal(got, ref[k])
        assert got.shape == ref[k].shape
    assert sd["half"].dtype == np.float32 and sd["bf16"].dtype == np.float32
    assert sd["scalar"].shape == ()


# ----------------------------------------------------------------- shapes


def test_random_teacher_reduced_width_shapes():
    module, variables = W.load_teacher("wide_resnet50_2", "random", width_divisor=16)
    out = jax.eval_shape(module.apply, variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert set(out) == {"layer1", "layer2", "layer3"}
    assert out["layer1"].shape == (2, 16, 16, 16)
    assert out["layer2"].shape == (2, 8, 8, 32)
    assert out["layer3"].shape == (2, 4, 4, 64)
    assert not any(k.startswith("layer4") or k == "fc" for k in variables["params"])
    assert "RANDOM" in W.describe_source("wide_resnet50_2", "random", 16)
    # bf16 compute keeps float32 parameters
    m16 = make_resnet("wide_resnet50_2", 16, dtype=jnp.bfloat16)
    o16 = jax.eval_shape(m16.apply, variables, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert o16["layer3"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))


def test_full_width_wrn50_shapes_eval_shape():
    module = make_resnet("wide_resnet50_2")
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert out["layer1"].shape == (1, 64, 64, 256)
    assert out["layer2"].shape == (1, 32, 32, 512)
    assert out["layer3"].shape == (1, 16, 16, 1024)
    assert set(out) == {"layer1", "layer2", "layer3"}
    assert tap_channels("wide_resnet50_2") == {"layer1": 256, "layer2": 512, "layer3": 1024}
    keys = W.expected_torch_keys(variables)
    assert keys["layer1.0.conv2.weight"][1] == (128, 128, 3, 3)
    assert keys["layer3.5.bn3.running_var"][1] == (1024,)
    assert not any(k.startswith(("layer4", "fc")) for k in keys)


def test_ported_roundtrip_and_auto_cache(tmp_path, monkeypatch):
    _, variables = W.load_teacher("wide_resnet50_2", "random", width_divisor=16)
    path = str(tmp_path / "port.npz")
    W.save_ported(path, variables, {"arch": "wide_resnet50_2", "width_divisor": 16})
    _, back = W.load_teacher("wide_resnet50_2", path, width_divisor=16)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(W.WeightMismatchError, match="layer1_0"):
        W.load_teacher("resnet50", path, width_divisor=16)
    # "auto" finds a port in the cache (here: a stand-in full-width resnet18 port)
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path))
    _, full = W.load_teacher("resnet18", "random")
    W.save_ported(str(tmp_path / "resnet18-f37072fd.kdjax.npz"), full, {"arch": "resnet18", "source": "x"})
    _, auto = W.load_teacher("resnet18", "auto")
    np.testing.assert_array_equal(auto["params"]["conv1"]["kernel"], full["params"]["conv1"]["kernel"])


def test_port_weights_tool(tmp_path):
    """tools/port_weights.py on a checkpoint whose name carries a wrong sha256 prefix fails clearly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "port_weights", os.path.join(os.path.dirname(__file__), "..", "tools", "port_weights.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tmp_path / "resnet18-deadbeef.pth"
    shutil.copy(g("resnet18_d16.pth"), bad)
    with pytest.raises(W.CheckpointFormatError, match="sha256"):
        W.port_torchvision("resnet18", str(bad))
    # right sha but reduced-width tensors: the tool reports the mismatch and exits 1
    assert tool.main(["--arch", "resnet18", "--src", str(bad), "--out", str(tmp_path / "o.npz"),
                      "--no-sha-check"]) == 1


# ----------------------------------------------------------------- bad input


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(W.CheckpointFormatError, match="not a PyTorch checkpoint"):
        W.load_torch_checkpoint(p)
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "x")
    with pytest.raises(W.CheckpointFormatError, match="data.pkl"):
        W.load_torch_checkpoint(z)
    with pytest.raises(FileNotFoundError):
        W.load_torch_checkpoint(tmp_path / "missing.pth")


def test_truncated_zip(tmp_path):
    data = open(g("wide_resnet50_2_d16.pth"), "rb").read()
    p = tmp_path / "wide_resnet50_2_cut.pth"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(W.CheckpointFormatError) as e:
        W.load_torch_checkpoint(p)
    assert str(p) in str(e.value) and "re-download" in str(e.value)
    legacy = open(g("resnet18_d16_legacy.pth"), "rb").read()
    q = tmp_path / "legacy_cut.pth"
    q.write_bytes(legacy[: len(legacy) - 1000])
    with pytest.raises(W.CheckpointFormatError, match="re-download"):
        W.load_torch_checkpoint(q)


def test_other_architecture_names_first_mismatch():
    state = W.load_torch_checkpoint(g("resnet18_d16.pth"))
    module = make_resnet("wide_resnet50_2", 16)
    with pytest.raises(W.WeightMismatchError) as e:
        W.teacher_variables_from_state_dict("wide_resnet50_2", state, module)
    msg = str(e.value)
    assert "layer1.0.conv1.weight" in msg and "(4, 4, 3, 3)" in msg and "(8, 4, 1, 1)" in msg, msg


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


class _EvilEval:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({self.target!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("evil_cls", [_Evil, _EvilEval])
@pytest.mark.parametrize("container", ["raw", "zip"])
def test_malicious_pickle_refused_nothing_executed(tmp_path, evil_cls, container):
    target = str(tmp_path / "pwned")
    payload = pickle.dumps({"weight": evil_cls(target)}, protocol=2)
    p = tmp_path / "evil.pth"
    if container == "raw":
        p.write_bytes(payload)
    else:
        with zipfile.ZipFile(p, "w") as f:
            f.writestr("archive/data.pkl", payload)
            f.writestr("archive/byteorder", "little")
    with pytest.raises(W.UnsafeCheckpointError) as e:
        W.load_torch_checkpoint(p)
    assert "mkdir" in str(e.value) or "eval" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not os.path.exists(target)


def test_auto_without_network_fails_fast(tmp_path, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KDJAX_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}/models/")
    t0 = time.time()
    with pytest.raises(W.WeightsUnavailableError) as e:
        W.load_teacher("wide_resnet50_2", "auto")
    assert time.time() - t0 < 15
    msg = str(e.value)
    for part in ("wide_resnet50_2-95faca4d.pth", f"127.0.0.1:{port}", str(tmp_path / "cache"),
                 "tools/port_weights.py"):
        assert part in msg, (part, msg)
    with pytest.raises(W.WeightsUnavailableError, match="teacher_small.pth"):
        W.load_teacher("pdn_small", "auto")
    with pytest.raises(ValueError, match="unknown teacher architecture"):
        W.load_teacher("vgg16", "random")


# ----------------------------------------------------------------- provenance


def _sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_teacher_provenance_random_and_files(tmp_path, monkeypatch):
    rec = W.teacher_provenance("wide_resnet50_2", "random", 16)
    assert rec == {"arch": "wide_resnet50_2", "source": "random", "file": None, "sha256": None,
                   "width_divisor": 16}
    W.check_provenance(rec)  # nothing to check
    pth = tmp_path / "teacher.pth"
    shutil.copy(g("pdn_s_d8.pth"), pth)
    monkeypatch.chdir(tmp_path)
    rec = W.teacher_provenance("pdn_small", "teacher.pth", 8)  # relative path: recorded absolute
    assert rec == {"arch": "pdn_small", "source": "teacher.pth", "file": str(pth), "sha256": _sha(pth),
                   "width_divisor": 8}
    npz = tmp_path / "port.npz"
    npz.write_bytes(b"stand-in port")
    rec_npz = W.teacher_provenance("resnet18", str(npz))
    assert rec_npz["file"] == str(npz) and rec_npz["sha256"] == _sha(npz)
    import json
    json.dumps(rec)  # recordable as is
    W.check_provenance(rec)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        W.teacher_provenance("pdn_small", str(tmp_path / "nope.pth"))


def test_teacher_provenance_auto_downloads_nothing(tmp_path, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDJAX_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KDJAX_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}/models/")
    for arch in ("wide_resnet50_2", "pdn_small"):
        rec = W.teacher_provenance(arch, "auto")
        assert rec == {"arch": arch, "source": "auto", "file": None, "sha256": None, "width_divisor": 1}
    assert not cache.exists()
    # a cached .pth, then the port "auto" prefers
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"stand-in pth")
    rec = W.teacher_provenance("resnet18", "auto")
    assert rec["file"] == str(hub / "resnet18-f37072fd.pth") and rec["sha256"] == _sha(rec["file"])
    cache.mkdir()
    (cache / "resnet18-f37072fd.kdjax.npz").write_bytes(b"stand-in port")
    rec = W.teacher_provenance("resnet18", "auto")
    assert rec["file"] == str(cache / "resnet18-f37072fd.kdjax.npz")
    assert rec["sha256"] == _sha(rec["file"])
    with pytest.raises(ValueError, match="unknown teacher architecture"):
        W.teacher_provenance("vgg16", "auto")


def test_check_provenance_changed_or_missing(tmp_path):
    f = tmp_path / "teacher.npz"
    f.write_bytes(b"the weights it was trained with")
    rec = W.teacher_provenance("resnet18", str(f))
    old = rec["sha256"]
    f.write_bytes(b"other weights")
    with pytest.raises(ValueError) as e:
        W.check_provenance(rec)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(f), old, _sha(f), "the teacher weights changed since this model was trained",
                 f"restore {f} or retrain"):
        assert part in msg, (part, msg)
    f.unlink()
    with pytest.raises(ValueError) as e:
        W.check_provenance(rec)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "missing" in msg and "retrain" in msg, msg


# ----------------------------------------------------------------- reference EfficientAD

EAD = {"model_size": "S", "out_channels": 48, "channels_divisor": 8}  # tools/make_golden.py


def _efficientad_inputs():
    """tools/make_golden.py efficientad_inputs() (drawn again: numpy's RandomState is stable)."""
    x_pdn = np.random.RandomState(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    x_ae = np.random.RandomState(1).standard_normal((1, 256, 256, 3)).astype(np.float32)
    return x_pdn, x_ae


def _efficientad_outputs(variables):
    """Outputs of the modules kdjax.methods.efficientad builds (channels 48 // 8, divisor 8)."""
    from kdjax.models.pdn import PDN, Autoencoder, pdn_output_size

    c, d = EAD["out_channels"] // EAD["channels_divisor"], EAD["channels_divisor"]
    x_pdn, x_ae = _efficientad_inputs()
    mods = {"teacher": (PDN("S", c, width_divisor=d), x_pdn),
            "student": (PDN("S", 2 * c, width_divisor=d), x_pdn),
            "ae": (Autoencoder(c, pdn_output_size(256, "S"), width_divisor=d), x_ae)}
    out = {}
    for role, (module, x) in mods.items():
        init = jax.eval_shape(module.init, jax.random.PRNGKey(0), x[:1])
        assert (jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables[role])), role
        for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(variables[role])):
            assert a.shape == b.shape and b.dtype == np.float32, role
        out[role] = np.asarray(jax.jit(module.apply)(variables[role], x))
    return out


def test_reference_efficientad_matches_torch(tmp_path):
    ref = np.load(g("efficientad_ref_s_d8.npz"))
    x_pdn, x_ae = _efficientad_inputs()
    np.testing.assert_array_equal(x_pdn.ravel()[:16], ref["x_pdn_head"])
    np.testing.assert_array_equal(x_ae.ravel()[:16], ref["x_ae_head"])
    variables = W.load_reference_efficientad(g("efficientad_ref_s_d8"), **EAD)
    assert set(variables) == {"teacher", "student", "ae"}
    assert all(set(v) == {"params"} for v in variables.values())
    out = _efficientad_outputs(variables)
    for role, name in (("teacher", "teacher"), ("student", "student"), ("ae", "autoencoder")):
        assert out[role].shape == ref[name].shape, role
        err = float(np.abs(out[role] - ref[name]).max())
        print(f"efficientad {role}: max abs deviation {err:.2e}")
        assert err <= 1e-5, (role, err)
    # whole pickled modules under the names the reference efficientad.py writes
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(g("efficientad_ref_s_d8/teacher.pth"), d / "teacher_final.pth")
    shutil.copy(g("efficientad_ref_s_d8/student.pth"), d / "student_final.pth")
    shutil.copy(g("efficientad_ref_s_d8_autoencoder_whole.pth"), d / "autoencoder_final.pth")
    whole = W.load_reference_efficientad(d, **EAD)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_array_equal(a, b)


def test_reference_efficientad_errors(tmp_path):
    src = g("efficientad_ref_s_d8")
    with pytest.raises(ValueError) as e:  # the medium architecture on small files
        W.load_reference_efficientad(src, "M", 48, 8)
    msg = str(e.value)
    assert os.path.join(src, "teacher.pth") in msg and "'0.weight'" in msg and "(32, 3, 4, 4)" in msg, msg
    assert "get_pdn_medium(6)" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"teacher\.pth.*'8\.weight'.*\(48, 32, 4, 4\)"):
        W.load_reference_efficientad(src, "S", 384, 8)  # 48 output channels expected, 6 there
    d = tmp_path / "run"
    d.mkdir()
    for name in ("teacher.pth", "student.pth"):
        shutil.copy(os.path.join(src, name), d / name)
    with pytest.raises(ValueError) as e:
        W.load_reference_efficientad(d, **EAD)
    msg = str(e.value)
    assert str(d / "autoencoder.pth") in msg and "missing" in msg and "get_autoencoder(6)" in msg, msg
    shutil.copy(os.path.join(src, "student.pth"), d / "autoencoder.pth")  # a PDN where the AE belongs
    with pytest.raises(ValueError, match=r"autoencoder\.pth \(EfficientAD-S ae\)"):
        W.load_reference_efficientad(d, **EAD)
    with pytest.raises(ValueError, match="not a directory"):
        W.load_reference_efficientad(os.path.join(src, "teacher.pth"), **EAD)
    with pytest.raises(ValueError, match="channels_divisor"):
        W.load_reference_efficientad(src, "S", 48, 5)
