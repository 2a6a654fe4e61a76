"""RD4AD / MRKD student modules (kdjax.models.rd) and reference-checkpoint import.

Golden: tools/make_golden.py builds the reference OCBE ("bn") + decoder
(de_wide_resnet50_2, MRKD with generation modules) at width/32 in torch and
saves {"bn": ..., "decoder": ...} checkpoints plus outputs for random teacher
features and FLM masks. tests/golden/reference_keys_*.txt are copies of
docs/reference_checkpoints.md (full-width key names and shapes of the
published code).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import weights as W
from kdjax.models.rd import RDStudent

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TOL = 1e-4
D = 32
TAPS = ("layer1", "layer2", "layer3")


def g(name):
    return os.path.join(GOLDEN, name)


@pytest.fixture(scope="module")
def ref():
    return np.load(g("rd_d32.npz"))


@pytest.fixture(scope="module")
def feats(ref):
    return {"layer1": ref["l1"], "layer2": ref["l2"], "layer3": ref["l3"]}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,generation", [("rd4ad", False), ("mrkd", True)])
def test_reference_checkpoint_parity(ref, feats, name, generation):
    variables = W.load_reference_rd_checkpoint(g(f"{name}_d32.pth"), D, generation)
    module = RDStudent(D, generation)
    apply = jax.jit(module.apply, static_argnums=2)
    out = apply(variables, feats, False)
    cases = [(out, f"{name}_")]
    if generation:
        masks = {t: ref[f"mask_{t}"] for t in TAPS}
        cases.append((apply(variables, feats, False, masks), f"{name}_masked_"))
    for o, prefix in cases:
        assert set(o) == set(TAPS)
        for t in TAPS:
            r = ref[prefix + t]
            assert o[t].shape == r.shape == feats[t].shape
            err = rel_err(o[t], r)
            print(f"{prefix}{t}: max rel deviation {err:.2e}")
            assert err <= TOL, (prefix, t, err)


def test_checkpoint_kind_mismatch_is_explained():
    with pytest.raises(W.WeightMismatchError, match="generation=True"):
        W.load_reference_rd_checkpoint(g("mrkd_d32.pth"), D, generation=False)
    with pytest.raises(W.WeightMismatchError, match="decoder.generation1.0.weight"):
        W.load_reference_rd_checkpoint(g("rd4ad_d32.pth"), D, generation=True)
    with pytest.raises(W.WeightMismatchError, match="bn.bn_layer.0.conv1.weight"):
        W.load_reference_rd_checkpoint(g("rd4ad_d32.pth"), 16, generation=False)


def _reference_keys(fname, prefix):
    keys = {}
    for line in open(g(fname)):
        k, shape = line.rstrip("\n").split("\t")
        keys[prefix + k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.parametrize("generation", [False, True])
def test_full_width_matches_reference_layout(generation):
    """Every reference tensor (but the unused ones) has a Flax leaf of the same shape, and vice versa."""
    template = W.rd_student_template(1, generation)
    expected = {k: v[1] for k, v in W.expected_torch_keys(template).items()}
    ref = _reference_keys("reference_keys_ocbe_rd4ad_mrkd.txt", "bn.")
    ref.update(_reference_keys(f"reference_keys_decoder_{'mrkd' if generation else 'rd4ad'}.txt", "decoder."))
    skipped = ("num_batches_tracked", "bn.conv4.", "bn.bn4.", "decoder.conv1.")
    ref = {k: v for k, v in ref.items() if not any(s in k for s in skipped)}
    assert expected == ref


def test_full_width_shapes_eval_shape():
    module = RDStudent(1, generation=True)
    feats = {"layer1": jax.ShapeDtypeStruct((2, 64, 64, 256), jnp.float32),
             "layer2": jax.ShapeDtypeStruct((2, 32, 32, 512), jnp.float32),
             "layer3": jax.ShapeDtypeStruct((2, 16, 16, 1024), jnp.float32)}
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats)
    out = jax.eval_shape(module.apply, variables, feats)
    assert {t: out[t].shape for t in TAPS} == {t: feats[t].shape for t in TAPS}
    from kdjax.models.rd import OCBE

    z = jax.eval_shape(lambda f: OCBE().init_with_output(jax.random.PRNGKey(0), f)[0], feats)
    assert z.shape == (2, 8, 8, 2048)
    small = RDStudent(1, ocbe_blocks=1, decoder_stages=(1, 1, 1))  # fast variant for method tests
    out = jax.eval_shape(lambda f: small.init_with_output(jax.random.PRNGKey(0), f)[0], feats)
    assert {t: out[t].shape for t in TAPS} == {t: feats[t].shape for t in TAPS}


def test_train_mode_masks_and_dtype(feats):
    module = RDStudent(D, generation=True)
    variables = W.load_reference_rd_checkpoint(g("mrkd_d32.pth"), D, True)
    masks = {t: np.zeros(feats[t].shape[:3] + (1,), np.float32) for t in TAPS}
    out, upd = jax.jit(lambda v, f, m: module.apply(v, f, True, m, mutable=["batch_stats"]))(
        variables, feats, masks)
    assert set(upd["batch_stats"]) == set(variables["batch_stats"])
    for t in TAPS:
        assert out[t].shape == feats[t].shape
    with pytest.raises(ValueError, match="generation=True"):
        jax.eval_shape(lambda v: RDStudent(D).apply(v, feats, False, masks),
                       W.load_reference_rd_checkpoint(g("rd4ad_d32.pth"), D))
    bf = jax.eval_shape(lambda v: RDStudent(D, True, dtype=jnp.bfloat16).apply(v, feats, False), variables)
    assert bf["layer1"].dtype == jnp.bfloat16
