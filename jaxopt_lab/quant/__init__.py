"""Quantization: packed `QTensor` storage, quantize/dequantize, fake quant and LSQ."""

from jaxopt_lab.quant.affine import affine_codes, affine_params, integer_range, round_half_away
from jaxopt_lab.quant.core import dequantize, quantize, quantize_array
from jaxopt_lab.quant.fake_quant import (
    fake_quant,
    fake_quantize_array,
    lsq_bounds,
    lsq_fake_quant,
    lsq_init,
)
from jaxopt_lab.quant.qtensor import QTensor, is_qtensor, pack, packed_length, unpack
from jaxopt_lab.quant.settings import LSQSettings, QuantSettings

__all__ = (
    "LSQSettings",
    "QTensor",
    "QuantSettings",
    "affine_codes",
    "affine_params",
    "dequantize",
    "fake_quant",
    "fake_quantize_array",
    "integer_range",
    "is_qtensor",
    "lsq_bounds",
    "lsq_fake_quant",
    "lsq_init",
    "pack",
    "packed_length",
    "quantize",
    "quantize_array",
    "round_half_away",
    "unpack",
)
