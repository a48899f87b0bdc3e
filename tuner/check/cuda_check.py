"""Compile GPU configs for real CUDA targets on a host without a GPU, and judge their resources.

How: the whole jitted operator is exported for CUDA (``jax.export(..., platforms=["cuda"])``),
which proves the launch code lowers and makes jax-triton compile every Triton kernel of the
call to PTX. While that runs, jax-triton's compile step is observed: each launch's grid,
warps, stages and shared memory are recorded, and the target's compute capability is
imposed (there is no local GPU to read it from). Each PTX is then assembled with the ptxas
that ships in the triton wheel, which reports registers and spills. A config whose shared
memory or registers exceed the target's limits cannot launch.

Requires the `gpu` (or `test`) extra: jax-cuda12-plugin, jax-triton, triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any

import jax

from attnbench.kernels.gpu_limits import SHARED_MEMORY_PER_BLOCK_BYTES
from attnbench.kernels.platform import lowering_for
from attnbench.kernels.tunables import KernelConfig

from ..measure.input_sets import with_array_keywords_last


@dataclasses.dataclass(frozen=True)
class CudaTarget:
    """The limits of one CUDA compute capability that decide whether a kernel can launch."""

    name: str  # "sm_90"
    compute_capability: int
    device_kind: str  # the normalized kind whose tuned entries apply, e.g. "nvidia-h100"
    shared_bytes_per_block: int  # the opt-in maximum of dynamic shared memory
    registers_per_block: int = 65536
    registers_per_thread: int = 255


_SHARED = SHARED_MEMORY_PER_BLOCK_BYTES
TARGETS = {
    "sm_80": CudaTarget("sm_80", 80, "nvidia-a100", _SHARED["sm_80"]),
    "sm_86": CudaTarget("sm_86", 86, "nvidia-a10", _SHARED["sm_86"]),
    "sm_89": CudaTarget("sm_89", 89, "nvidia-l4", _SHARED["sm_89"]),
    "sm_90": CudaTarget("sm_90", 90, "nvidia-h100", _SHARED["sm_90"]),
}


def gpu_kernel_variants(op: str | None = None) -> list:
    """The variants that compile GPU kernels of their own: those that run natively on GPUs
    only (XLA variants, which run everywhere, leave code generation to XLA)."""
    from attnbench.kernels import registry

    return [v for v in registry.variants(op) if tuple(v.platforms) == ("gpu",)]


def parse_target(text: str) -> CudaTarget:
    """'cuda:sm_90' (or 'sm_90') -> its CudaTarget; a ValueError lists the known ones."""
    name = text.removeprefix("cuda:")
    if name not in TARGETS:
        raise ValueError(f"--target: unknown CUDA target {text!r}; known: "
                         f"{['cuda:' + known for known in TARGETS]}")
    return TARGETS[name]


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What one compiled Triton kernel of a call needs to launch."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers_per_thread: int | None  # None when ptxas could not assemble the PTX
    spill_bytes: int | None  # spill stores + loads reported by ptxas


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The verdict on one config for one target."""

    target: str
    status: str  # "ok", "unlaunchable" or "compile_error"
    reason: str  # why not ok (empty when ok)
    kernels: tuple[KernelResources, ...] = ()

    @property
    def launchable(self) -> bool:
        return self.status == "ok"


def ptxas_paths() -> list[str]:
    """The ptxas binaries inside the triton wheel (no CUDA toolkit needed), newest last.

    Triton may emit a PTX version newer than its plain ptxas accepts for some targets; the
    Blackwell build beside it reads newer PTX, so both are tried.
    """
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(folder, name) for name in ("ptxas", "ptxas-blackwell")]
    paths = [path for path in paths if os.path.exists(path)]
    if not paths:
        raise FileNotFoundError(f"no ptxas in {folder}; is triton installed with its NVIDIA "
                                "backend?")
    return paths


def assemble(ptx: str) -> tuple[int, int]:
    """Assembles PTX with ptxas; returns (registers per thread, spill bytes).

    Raises RuntimeError with ptxas' message when no ptxas assembles the PTX.
    """
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if arch is None:
        raise RuntimeError("PTX has no .target line")
    errors = []
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        for ptxas in ptxas_paths():
            done = subprocess.run(
                [ptxas, "-v", "--gpu-name", arch.group(1), "--output-file",
                 os.path.join(folder, "kernel.cubin"), source],
                capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            errors.append(f"{os.path.basename(ptxas)}: {done.stderr.strip()[-1000:]}")
        else:
            raise RuntimeError("ptxas failed: " + " | ".join(errors))
    report = done.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return (int(registers.group(1)) if registers else 0), sum(spills)


@contextlib.contextmanager
def _observe_triton_compiles(compute_capability: int, launches: list[dict[str, Any]]):
    """Records every jax-triton kernel compile (grid, warps, stages, PTX, shared memory)
    and imposes `compute_capability`, for the duration of the block."""
    from jax_triton import triton_lib

    original_grid = triton_lib.normalize_grid
    original_create = triton_lib.get_or_create_triton_kernel
    original_compile = triton_lib.compile_ttir_to_ptx_inplace

    def normalize_grid(grid, metaparams):
        normalized = original_grid(grid, metaparams)
        launches.append({"grid": tuple(int(g) for g in normalized)})
        return normalized

    def get_or_create(*args, **kwargs):
        kwargs["compute_capability"] = compute_capability
        launches[-1].update(name=getattr(args[2], "__name__", str(args[2])),
                            num_warps=kwargs.get("num_warps") or 4,
                            num_stages=kwargs.get("num_stages") or 3)
        return original_create(*args, **kwargs)

    def compile_to_ptx(*args, **kwargs):
        result = original_compile(*args, **kwargs)
        launches[-1].update(ptx=result.binary, shared=int(result.shared_mem_bytes),
                            kernel_name=result.name)
        return result

    # Compiled kernels are cached by jax-triton; clear it so every launch is observed.
    saved_cache = dict(triton_lib._COMPILED_KERNEL_CACHE)
    triton_lib._COMPILED_KERNEL_CACHE.clear()
    triton_lib.normalize_grid = normalize_grid
    triton_lib.get_or_create_triton_kernel = get_or_create
    triton_lib.compile_ttir_to_ptx_inplace = compile_to_ptx
    try:
        yield
    finally:
        triton_lib.normalize_grid = original_grid
        triton_lib.get_or_create_triton_kernel = original_create
        triton_lib.compile_ttir_to_ptx_inplace = original_compile
        triton_lib._COMPILED_KERNEL_CACHE.clear()
        triton_lib._COMPILED_KERNEL_CACHE.update(saved_cache)


def check_config(problem, variant: str, config: KernelConfig, target: CudaTarget) -> CheckResult:
    """Exports the operator call for CUDA with this variant and config, then judges resources."""
    from attnbench.kernels.registry import get_operator

    operator = get_operator(problem.op).function
    arrays, kwargs = problem.abstract_inputs()
    kwargs.update(variant=variant, config=config.to_dict())
    call, trailing = with_array_keywords_last(operator, len(arrays), kwargs)
    all_inputs = arrays + trailing
    launches: list[dict[str, Any]] = []
    try:
        with _observe_triton_compiles(target.compute_capability, launches), \
                lowering_for("gpu", target.device_kind):
            jax.export.export(
                jax.jit(call), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
            )(*all_inputs)
    except Exception as error:  # noqa: BLE001 -- a config that does not compile is a result
        return CheckResult(target.name, "compile_error", f"{type(error).__name__}: {error}"[:2000])
    if not launches:
        return CheckResult(target.name, "compile_error",
                           f"variant {variant!r} launched no Triton kernel for CUDA")
    resources = []
    for launch in launches:
        try:
            registers, spills = assemble(launch["ptx"])
        except (RuntimeError, KeyError) as error:
            return CheckResult(target.name, "compile_error", str(error)[:2000])
        resources.append(KernelResources(
            name=launch.get("kernel_name", launch.get("name", "?")), grid=launch["grid"],
            num_warps=launch["num_warps"], num_stages=launch["num_stages"],
            shared_bytes=launch["shared"], registers_per_thread=registers, spill_bytes=spills))
    reasons = []
    for kernel in resources:
        if kernel.shared_bytes > target.shared_bytes_per_block:
            reasons.append(f"{kernel.name} needs {kernel.shared_bytes} bytes of shared memory; "
                           f"{target.name} allows {target.shared_bytes_per_block} per block")
        block_registers = (kernel.registers_per_thread or 0) * kernel.num_warps * 32
        if block_registers > target.registers_per_block:
            reasons.append(f"{kernel.name} needs {block_registers} registers per block "
                           f"({kernel.registers_per_thread}/thread x {kernel.num_warps} warps); "
                           f"{target.name} has {target.registers_per_block}")
    status = "unlaunchable" if reasons else "ok"
    return CheckResult(target.name, status, "; ".join(reasons), tuple(resources))
