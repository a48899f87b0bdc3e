"""Compile GPU configs for real CUDA targets on a host without a GPU, and judge their resources.

How: the jitted operator is traced (milliseconds), which runs the launch code and gives each
Triton launch's kernel, constants, warps, stages and grid; a hash of what decides the compiled
code (:func:`kernel_key`, not the grid) names each kernel. The call is then exported for CUDA
(``jax.export(..., platforms=["cuda"])``), which proves it lowers and makes jax-triton compile
its kernels to PTX; that compile step is observed (shared memory, PTX) and given the target's
compute capability (there is no local GPU to read it from). Each PTX is then assembled with the ptxas
that ships in the triton wheel, which reports registers and spills. A config whose shared
memory or registers exceed the target's limits cannot launch.

Requires the `gpu` (or `test`) extra: jax-cuda12-plugin, jax-triton, triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
    only (XLA variants, which run everywhere, leave code generation to XLA). Peers launch
    through their projects' own paths (Pallas' Triton lowering, ejkernel's call), which this
    check does not trace: their failures show in the sweep itself."""
    from attnbench.kernels import registry

    return [v for v in registry.variants(op)
            if tuple(v.platforms) == ("gpu",) and v.peer is None]


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


# The parameters of jax-triton's kernel-call primitive that are not the kernel's metaparams.
_CALL_PARAMS = frozenset({
    "fn", "scalar_args", "name", "custom_call_target_name", "out_shapes", "grid", "num_warps",
    "num_stages", "num_ctas", "compute_capability", "enable_fp_fusion", "input_output_aliases",
    "zeroed_outputs", "debug", "serialized_metadata"})


def kernel_key(fn, arg_dtypes, scalar_args, metaparams, num_warps, num_stages, num_ctas,
               enable_fp_fusion, compute_capability: int) -> str:
    """A hash of everything that decides what a Triton kernel compiles to: its source (with
    the jitted functions it calls: ``JITFunction.cache_key``), argument types, the scalar
    specializations jax-triton makes (None and 1), constants, warps, stages and target.
    Not the grid: the same kernel launches on any grid."""
    scalars = tuple((int(i), str(d), v is None, isinstance(v, (int, float)) and v == 1)
                    for i, d, v in scalar_args)
    text = repr((getattr(fn, "__name__", str(fn)), fn.cache_key, tuple(map(str, arg_dtypes)),
                 scalars, tuple(sorted((k, repr(v)) for k, v in metaparams.items())),
                 num_warps or 4, num_stages or 3, num_ctas, bool(enable_fp_fusion),
                 int(compute_capability)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class TracedKernel:
    """One Triton launch of a traced call: which kernel (its key) and on what grid."""

    key: str
    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KernelCompile:
    """What compiling one kernel key gave: its resources, or the compiler's error."""

    name: str
    shared_bytes: int = 0
    registers_per_thread: int | None = None
    spill_bytes: int | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _call_and_inputs(problem, variant: str, config: KernelConfig):
    from attnbench.kernels.registry import get_operator

    operator = get_operator(problem.op).function
    arrays, kwargs = problem.abstract_inputs()
    kwargs.update(variant=variant, config=config.to_dict())
    call, trailing = with_array_keywords_last(operator, len(arrays), kwargs)
    return call, arrays + trailing


def _kernel_calls(jaxpr):
    """The jax-triton kernel-call equations of a jaxpr, nested ones included, in order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "triton_kernel_call":
            yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _kernel_calls(inner)


def trace_kernels(problem, variant: str, config: KernelConfig,
                  target: CudaTarget) -> list[TracedKernel]:
    """The Triton launches of the operator call, from tracing it (milliseconds; no compile).
    Errors of the launch code (a config it refuses) propagate."""
    from jax_triton import triton_lib

    call, inputs = _call_and_inputs(problem, variant, config)
    with lowering_for("gpu", target.device_kind):
        traced = jax.jit(call).trace(*inputs)
    kernels = []
    for eqn in _kernel_calls(traced.jaxpr.jaxpr):
        params = eqn.params
        metaparams = {k: v for k, v in params.items() if k not in _CALL_PARAMS}
        # The argument types jax-triton's lowering gives the kernel: inputs, scalars, outputs.
        arg_dtypes = [triton_lib.get_triton_type(v.aval) for v in eqn.invars]
        for index, dtype, _ in params["scalar_args"]:
            arg_dtypes.insert(index, dtype)
        arg_dtypes += [triton_lib.get_triton_type(v.aval) for v in eqn.outvars]
        key = kernel_key(params["fn"], arg_dtypes, params["scalar_args"], metaparams,
                         params["num_warps"], params["num_stages"], params["num_ctas"],
                         params["enable_fp_fusion"], target.compute_capability)
        grid = tuple(int(g) for g in triton_lib.normalize_grid(params["grid"], metaparams))
        kernels.append(TracedKernel(key, getattr(params["fn"], "__name__", params["name"]), grid,
                                    params["num_warps"] or 4, params["num_stages"] or 3))
    return kernels


# Kernels this process compiled, by key: jax-triton keeps the compiled kernels of a process,
# so a key compiled once is not compiled (nor observed) again.
_COMPILED: dict[str, KernelCompile] = {}


@contextlib.contextmanager
def _observe_triton_compiles(compute_capability: int, seen: list[str]):
    """Imposes `compute_capability` (there is no local GPU to read it from) on every
    jax-triton kernel compile in the block, records each newly compiled kernel's PTX
    resources (or its error) in `_COMPILED`, and appends each launched kernel's key to `seen`."""
    from jax_triton import triton_lib

    original_create = triton_lib.get_or_create_triton_kernel
    original_compile = triton_lib.compile_ttir_to_ptx_inplace
    compiled: list[Any] = []

    def get_or_create(backend_init, platform, fn, arg_dtypes, scalar_args, **kwargs):
        kwargs["compute_capability"] = compute_capability
        key = kernel_key(fn, arg_dtypes, scalar_args, kwargs["metaparams"], kwargs["num_warps"],
                         kwargs["num_stages"], kwargs["num_ctas"], kwargs["enable_fp_fusion"],
                         compute_capability)
        seen.append(key)
        name = getattr(fn, "__name__", str(fn))
        compiled.clear()
        try:
            result = original_create(backend_init, platform, fn, arg_dtypes, scalar_args, **kwargs)
        except Exception as error:
            _COMPILED[key] = KernelCompile(name, error=f"{type(error).__name__}: {error}"[:2000])
            raise
        if compiled and key not in _COMPILED:
            _COMPILED[key] = _assembled(compiled[-1])
        return result

    def compile_to_ptx(*args, **kwargs):
        result = original_compile(*args, **kwargs)
        compiled.append(result)
        return result

    triton_lib.get_or_create_triton_kernel = get_or_create
    triton_lib.compile_ttir_to_ptx_inplace = compile_to_ptx
    try:
        yield
    finally:
        triton_lib.get_or_create_triton_kernel = original_create
        triton_lib.compile_ttir_to_ptx_inplace = original_compile


def _assembled(result) -> KernelCompile:
    try:
        registers, spills = assemble(result.binary)
    except RuntimeError as error:
        return KernelCompile(result.name, int(result.shared_mem_bytes), error=str(error)[:2000])
    return KernelCompile(result.name, int(result.shared_mem_bytes), registers, spills)


def compile_kernels(problem, variant: str, config: KernelConfig,
                    target: CudaTarget) -> tuple[dict[str, KernelCompile], str]:
    """Exports the operator call for CUDA, which makes jax-triton compile its kernels; returns
    (what each launched kernel key compiled to, the export's own error or "")."""
    call, inputs = _call_and_inputs(problem, variant, config)
    seen: list[str] = []
    error = ""
    try:
        with _observe_triton_compiles(target.compute_capability, seen), \
                lowering_for("gpu", target.device_kind):
            jax.export.export(
                jax.jit(call), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
            )(*inputs)
    except Exception as failure:  # noqa: BLE001 -- a config that does not compile is a result
        error = f"{type(failure).__name__}: {failure}"[:2000]
    return {key: _COMPILED[key] for key in seen if key in _COMPILED}, error


def judge(target: CudaTarget, kernels: list[TracedKernel],
          compiled: dict[str, KernelCompile]) -> CheckResult:
    """The verdict on a config from its traced launches and what their kernels compiled to."""
    if not kernels:
        return CheckResult(target.name, "compile_error",
                           "the call launched no Triton kernel for CUDA")
    resources = []
    for kernel in kernels:
        done = compiled.get(kernel.key)
        if done is None:
            return CheckResult(target.name, "compile_error", f"{kernel.name} was not compiled")
        if done.error:
            return CheckResult(target.name, "compile_error", done.error)
        resources.append(KernelResources(
            name=done.name, grid=kernel.grid, num_warps=kernel.num_warps,
            num_stages=kernel.num_stages, shared_bytes=done.shared_bytes,
            registers_per_thread=done.registers_per_thread, spill_bytes=done.spill_bytes))
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


def check_config(problem, variant: str, config: KernelConfig, target: CudaTarget) -> CheckResult:
    """Traces the operator call with this variant and config, exports it for CUDA (compiling
    the kernels this process has not compiled yet), then judges their resources."""
    try:
        kernels = trace_kernels(problem, variant, config, target)
    except Exception as error:  # noqa: BLE001 -- a config the launch code refuses is a result
        return CheckResult(target.name, "compile_error", f"{type(error).__name__}: {error}"[:2000])
    compiled, error = compile_kernels(problem, variant, config, target)
    if error:
        return CheckResult(target.name, "compile_error", error)
    return judge(target, kernels, compiled)
