"""The limits of NVIDIA GPUs and of Triton that the Triton variants' validity rules encode.

Per-block shared memory by target, registers per thread, the warp size, and tl.dot's minimum
block size.

A config's validity rule (``invalid_reason``) may plan on the most any supported target
offers, so that sweeps can reach configs only an H100 can run; heuristic defaults keep within
what every target offers, so they run anywhere. Whether a config launches on one target is
judged by compiling it for that target: ``attnbench check`` (tuner/cuda_check.py).
"""

from .tunables import next_power_of_two

# The opt-in maximum of shared memory per block, by compute capability (NVIDIA's CUDA
# programming guide).
SHARED_MEMORY_PER_BLOCK_BYTES = {
    "sm_80": 163 * 1024,  # A100
    "sm_86": 99 * 1024,  # A10, RTX 30xx
    "sm_89": 99 * 1024,  # L4, L40, RTX 40xx
    "sm_90": 227 * 1024,  # H100, H200
}
# The budget of validity rules: the largest target's (sm_90).
MAX_SHARED_MEMORY_BYTES = max(SHARED_MEMORY_PER_BLOCK_BYTES.values())
# The budget of heuristic defaults: the smallest target's (sm_86, sm_89).
PORTABLE_SHARED_MEMORY_BYTES = min(SHARED_MEMORY_PER_BLOCK_BYTES.values())

# Registers per thread a kernel's big tiles may take by the variants' estimates
# (`tile_registers_per_thread`); 255 is the hardware cap and the rest of a kernel needs room.
# Checked against `ptxas -v` (Triton 3.9, sm_90) on 50 split-KV decode configs: none at or
# under this spilled; ptxas needs about twice the estimate plus ~40.
TILE_REGISTERS_PER_THREAD = 128
THREADS_PER_WARP = 32
# tl.dot needs every block dimension to be at least 16.
MIN_DOT_SIZE = 16


def padded_head_dim(head_dim: int) -> int:
    """D rounded up to a power of two >= 16: Triton blocks are powers of two, dots >= 16."""
    return max(MIN_DOT_SIZE, next_power_of_two(head_dim))
