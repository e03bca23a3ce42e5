"""Convolutions computed as patch matrix products, for vmapped training on CPU.

Under ``jax.vmap`` over per-configuration kernels, ``lax.conv_general_dilated`` and its
gradients become grouped convolutions, which XLA's CPU backend runs far slower than
plain ones (measured 25x for 8 configurations of the reference student). Written as
shifted slices of the (padded) input concatenated into patches, times the kernel
reshaped to a matrix, the same convolution is a matrix product, and a vmapped matrix
product is a batched one, which every backend runs well. The result equals the
convolution up to float summation order.

Only the common case is rewritten -- 2-D, NHWC/HWIO, unit strides and dilations, one
feature group -- anything else runs ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.core.flax_hooks import intercept_linen


def _is_simple(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(s != 1 for s in window_strides):
        return False
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == nhwc


def conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                   precision=None, preferred_element_type=None) -> jax.Array:
    """``lax.conv_general_dilated``'s signature and result, as patches @ kernel matrix."""
    if not _is_simple(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    kh, kw, cin, cout = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate(
        [x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwp,pf->nhwf", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision, preferred_element_type=preferred_element_type)


def _conv_handler(module, method_name, call, args, kwargs):
    if (type(module) is not nn.Conv or method_name != "__call__"
            or module.conv_general_dilated is not None
            or module.conv_general_dilated_cls is not None):
        return call(*args, **kwargs)
    object.__setattr__(module, "conv_general_dilated", conv_as_matmul)
    try:
        return call(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def convs_as_matmuls() -> Iterator[None]:
    """Within this context, linen ``nn.Conv`` layers compute with :func:`conv_as_matmul`."""
    with intercept_linen(_conv_handler):
        yield
