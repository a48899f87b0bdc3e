"""The attention operators and everything that picks their kernels.

    from attnbench.kernels import decode_attention, ragged_paged_attention
"""

from .inputs import DecodeShape, PagedShape
from .lookup import choose
from .operators import check_inputs, decode_attention, ragged_paged_attention
from .registry import VARIANTS, get_variant, variants
from .variant import UnsupportedError

__all__ = [
    "DecodeShape", "PagedShape", "UnsupportedError", "VARIANTS", "check_inputs", "choose",
    "decode_attention", "get_variant", "ragged_paged_attention", "variants",
]
