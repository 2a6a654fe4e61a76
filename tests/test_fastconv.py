"""kdjax.backends.fastconv: the same convolution and gradients as lax.conv_general_dilated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kdjax.backends import fastconv

DN = ("NHWC", "HWIO", "NHWC")


# (kernel, stride, padding, height, input channels). With 16 or more input channels
# strided convolutions and stride-1 ones with at most fastconv.IM2COL_MAX_PIXELS
# output pixels take the im2col path (h=6: 6x7 outputs); 1x1 without padding is a
# matmul; the rest is XLA's convolution with fastconv's gradients.
@pytest.mark.parametrize("k,s,p,h,ci", [(1, 1, 0, 9, 3), (1, 2, 0, 8, 3), (1, 2, 0, 9, 3),
                                        (1, 1, 1, 5, 3), (3, 1, 1, 8, 3), (3, 2, 1, 9, 3),
                                        (3, 2, 1, 8, 3), (4, 1, 0, 11, 3), (4, 1, 3, 10, 3),
                                        (7, 2, 3, 13, 3), (3, 2, 1, 9, 16), (3, 1, 1, 6, 16),
                                        (3, 1, 1, 12, 16), (4, 1, 2, 5, 16)])
def test_values_and_gradients_match_lax(k, s, p, h, ci):
    rng = np.random.default_rng(k * 100 + s * 10 + h + ci)
    x = jnp.asarray(rng.normal(size=(2, h, h + 1, ci)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, ci, 5)), jnp.float32)
    pad = ((p, p), (p, p))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (s, s), pad, dimension_numbers=DN)))

    want_y = lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)
    got_y = jax.jit(lambda x, w: fastconv.conv_general_dilated(x, w, (s, s), pad,
                                                               dimension_numbers=DN))(x, w)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want_y))))
    want = jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.jit(jax.value_and_grad(loss(fastconv.conv_general_dilated), (0, 1)))(x, w)
    # sin of sums of up to 16 * 16 products: float32 summation order shows.
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_other_layouts_fall_back_to_lax():
    x = jnp.ones((1, 3, 6, 6))
    w = jnp.ones((4, 3, 3, 3))
    dn = ("NCHW", "OIHW", "NCHW")
    np.testing.assert_array_equal(
        fastconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))


@pytest.mark.parametrize("k,h,ci,pad", [(4, 9, 3, ((0, 0), (0, 0))), (3, 7, 16, ((0, 0), (0, 0))),
                                        (4, 6, 3, ((2, 2), (2, 2))), (3, 5, 4, ((1, 2), (0, 1)))])
def test_im2col_conv_matches_lax(k, h, ci, pad):
    """The PDN's stride-1 im2col convolution: values, kernel gradient (patches^T g)
    and input gradient (the flipped-kernel convolution, back padding k - 1 - p)."""
    rng = np.random.default_rng(k + h + ci)
    x = jnp.asarray(rng.normal(size=(2, h, h + 2, ci)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, ci, 5)), jnp.float32)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)

    def ours(x, w):
        return fastconv.im2col_conv(x, w, pad)

    want_y = ref(x, w)
    got_y = jax.jit(ours)(x, w)
    scale = float(jnp.max(jnp.abs(want_y)))
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5 * scale)
    want = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), (0, 1))(x, w)
    got = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), (0, 1)))(x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_im2col_conv_rejects_padding_beyond_kernel():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="exceeds kernel size"):
        fastconv.im2col_conv(x, w, ((3, 3), (0, 0)))
