"""Quantization: packed `QTensor` storage, quantize/dequantize, fake quant and LSQ."""

from jaxopt_lab.quant.core import (
    affine_codes,
    affine_params,
    dequantize,
    integer_range,
    quantize,
    quantize_array,
)
from jaxopt_lab.quant.qtensor import QTensor, is_qtensor, pack, packed_length, unpack
