"""attnbench: benchmark and autotune attention kernels for LLM inference in JAX.

The operators live in :mod:`attnbench.kernels`; the tuner that writes the tables they
read lives in :mod:`attnbench.tuner`.
"""

__version__ = "0.1.0"
