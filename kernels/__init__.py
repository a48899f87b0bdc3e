"""The attention operators and everything that picks their kernels.

    from attnbench.kernels import (decode_attention, ragged_paged_attention,
                                   ragged_paged_attention_v3)

Their contract is docs/semantics.md.
"""

# The registry first: it imports every operator package, whose public functions reach back
# to the lookup (and so to the registry) only when called.
from .registry import OPERATORS, VARIANTS, get_operator, get_variant, variants  # isort: skip
from .decode.inputs import DecodeShape
from .decode.operator import decode_attention
from .lookup import choose
from .paged.inputs import PagedShape
from .paged.operator import ragged_paged_attention
from .paged_v3.inputs import PagedV3Shape
from .paged_v3.operator import ragged_paged_attention_v3
from .run import check_inputs
from .variant import UnsupportedError

__all__ = [
    "DecodeShape", "OPERATORS", "PagedShape", "PagedV3Shape", "UnsupportedError", "VARIANTS",
    "check_inputs", "choose", "decode_attention", "get_operator", "get_variant", "ragged_paged_attention",
    "ragged_paged_attention_v3", "variants",
]
