"""Per-block shared memory of the NVIDIA GPUs the Triton variants are configured for.

A config's validity rule (``invalid_reason``) may plan on the most any supported target
offers, so that sweeps can reach configs only an H100 can run; heuristic defaults keep within
what every target offers, so they run anywhere. Whether a config launches on one target is
judged by compiling it for that target: ``attnbench check`` (tuner/cuda_check.py).
"""

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
