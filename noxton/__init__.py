"""noxton: torch-exact attention layers for JAX, from Haiku and from Equinox.

- ``noxton.nn``: Equinox modules (``MultiheadAttention``, ``SqueezeExcitation``, torch's Transformer layers
  and stacks, ``LayerNorm``, ``Linear``).
- ``noxton.haiku``: the same layers as Haiku modules.
- ``noxton.functional``: the maths both front ends run.
- ``noxton.interop``: torch ``state_dict`` <-> Haiku params and Equinox models.

Importing ``noxton`` sets glibc's ``malloc`` thresholds and top padding where XLA's CPU kernels run at their best
(``noxton._malloc``; ``NOXTON_KEEP_MALLOC=1`` leaves them alone).
"""

from noxton import functional as functional
from noxton import haiku as haiku
from noxton import interop as interop
from noxton import nn as nn
from noxton._malloc import tune_malloc as _tune_malloc

_tune_malloc()

__version__ = "0.1.0"

__all__ = ["functional", "haiku", "interop", "nn", "__version__"]
