"""jaxopt_lab: make trained JAX models smaller, faster and cheaper.

Pure-function transforms on parameter pytrees (quantize, prune, distill, fold batch
norm) that compose with each other and with optax. See README.md and DESIGN.md.
"""

# Each area keeps its re-exports in its own block; edit only your block.
# --- training and data ---
from jaxopt_lab import metrics
from jaxopt_lab import train
# --- end training and data ---

# --- quantization ---
# --- end quantization ---

# --- pruning ---
# --- end pruning ---

# --- distillation ---
# --- end distillation ---

# --- folding ---
# --- end folding ---

__version__ = "0.1.0"

__all__ = (
    "metrics",
    "train",
)
