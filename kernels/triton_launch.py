"""Launching the Triton variants' kernels from JAX: on GPUs, or in Triton's CPU interpreter.

A Triton variant writes its kernels as plain functions and its launch code against
:data:`Launch`; :func:`jit_kernel` wraps a kernel for GPUs or for the interpreter.
:func:`gpu_launch` launches through jax-triton; :func:`call_interpreted` runs the same launch
code on the host through ``jax.pure_callback``, on torch CPU tensors, with
:func:`interpreter_launch` and inside :func:`interpreter_scope` (triton 3.9).

The interpreter is made for processes that set ``TRITON_INTERPRET=1`` before importing triton;
here it shares a process with GPU compiles (jax.export for CUDA), so what it needs is set up
only while :func:`interpreter_scope` is open and triton is put back exactly as it was on exit.

triton and torch are imported inside functions: this module imports without them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .sharding import check_interpreter_threads, out_struct

# A launch function runs `kernel` on `grid` with `inputs` (arrays of its backend, then plain
# Python ints: sizes passed at run time, so one compiled kernel serves every size), then the
# outputs, each given as (shape, dtype name) and filled with NaN first, as
# launch(kernel, grid, inputs, out_shapes, constants, num_warps, num_stages), and returns the
# outputs. Kernels take each output twice: once as the aliased NaN-filled input jax-triton passes
# as a pointer of its own, once as the output.
Launch = Callable[..., tuple]

_MISSING = object()
# The interpreter keeps its state (grid position, the patched language) in globals: one
# interpreted launch at a time, whichever thread jax runs the callback on.
_INTERPRETER_LOCK = threading.RLock()


@functools.cache
def jit_kernel(function: Callable, interpret: bool):
    """`function` wrapped by ``triton.jit``: for GPUs, or for Triton's CPU interpreter.

    ``triton.jit`` reads the interpret setting when it wraps, not when the kernel is launched,
    so each wrapping is made under its own setting (and cached). Launch interpreted kernels
    inside :func:`interpreter_scope`.
    """
    import triton

    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(function)


def _patched_objects() -> tuple[tuple[Any, ...], tuple[type, ...]]:
    """(modules, classes) whose attributes an interpreted launch replaces: the helpers swapped
    here, and everything triton's ``_patch_lang`` touches (builtins of tl, tl.core, tl.math;
    methods of tensor, tensor_descriptor_base, condition, dtype)."""
    import triton.language as tl

    modules = (tl, tl.core, tl.math, tl.standard)
    classes = (tl.tensor, tl.core.tensor_descriptor_base, tl.condition, tl.dtype)
    return modules, classes


def _restore_attributes(owner: Any, saved: dict[str, Any], *, drop_added: bool) -> None:
    current = vars(owner)
    for name, value in saved.items():
        if current.get(name, _MISSING) is not value:
            setattr(owner, name, value)
    if drop_added:
        for name in set(current) - set(saved):
            delattr(owner, name)


def _bfloat16_as_float32(handle):
    """A bfloat16 interpreter tensor handle (stored as uint16 bits) widened, exactly, to f32."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


@contextlib.contextmanager
def interpreter_scope() -> Iterator[None]:
    """Makes Triton's interpreter able to run kernels made by ``jit_kernel(f, True)`` while open.

    1. The interpreter can only call helpers built while TRITON_INTERPRET was set, and
       triton.language's ``@jit`` helpers (tl.max, tl.sum, tl.cdiv) were built without it. Each
       is swapped for an interpreted twin of the same function; one twin per helper, so the
       interpreter's identity checks (``combine_fn is tl.standard._elementwise_max``, which pick
       its numpy fast paths) still hold.
    2. The interpreter's ``tl.dot`` multiplies bfloat16 operands as their raw uint16 bits; they
       are widened to float32 first, exactly, which is what a GPU's bfloat16 MMA with float32
       accumulation computes.
    3. An interpreted helper call replaces triton.language's builtins with interpreter ones and
       never puts them back; left so, every later GPU compile in the process fails
       ("'block_argument' object has no attribute 'get_element_ty'"). So the attributes of
       every module and class the interpreter patches are saved on entry and put back on exit,
       exactly (names added to classes are removed). Names the interpreter adds to modules
       (``_InterpreterComparison``, which its rewritten helpers call) are new names that
       shadow nothing and are kept: the rewritten helpers are cached and need them.

    Reentrant, and held by one thread at a time.
    """
    from triton.runtime.interpreter import InterpretedFunction, interpreter_builder
    from triton.runtime.jit import JITFunction

    # The first interpreted launch imports gluon, which refuses to import while the helpers
    # are swapped: import it now.
    import triton.experimental.gluon  # noqa: F401

    with _INTERPRETER_LOCK:
        modules, classes = _patched_objects()
        saved = [(owner, dict(vars(owner))) for owner in modules + classes]
        saved_dot = vars(interpreter_builder).get("create_dot", _MISSING)
        try:
            twins: dict[int, InterpretedFunction] = {}
            for module in modules:
                for name, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):
                        twin = twins.setdefault(id(value), InterpretedFunction(value.fn))
                        setattr(module, name, twin)
            inner_dot = interpreter_builder.create_dot

            def widening_dot(a, b, accumulator, *rest):
                return inner_dot(_bfloat16_as_float32(a), _bfloat16_as_float32(b), accumulator,
                                 *rest)

            interpreter_builder.create_dot = widening_dot
            yield
        finally:
            if saved_dot is _MISSING:
                vars(interpreter_builder).pop("create_dot", None)  # the class's shows again
            else:
                interpreter_builder.create_dot = saved_dot
            for owner, attributes in saved:
                _restore_attributes(owner, attributes, drop_added=isinstance(owner, type))


# ---- Host side: torch tensors for the interpreter -------------------------------------------


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16, "int32": torch.int32}[name]


def to_torch(array: np.ndarray):
    """A writable C-contiguous copy of `array` as a torch CPU tensor (bfloat16 included)."""
    import torch

    # A copy: torch wants writable buffers and a callback's arrays may be read-only.
    array = np.array(array, order="C")
    if array.dtype == jnp.bfloat16:  # torch cannot read numpy's bfloat16: pass the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def interpreter_launch(kernel, grid, inputs, out_shapes, constants, num_warps, num_stages):
    """A :data:`Launch` for Triton's interpreter on torch CPU tensors."""
    import torch

    outputs = [torch.full(shape, float("nan"), dtype=torch_dtype(dtype))
               for shape, dtype in out_shapes]
    # Each output twice: once as the aliased poisoned input jax-triton would pass, once as
    # the output itself (the same buffer, as under input_output_aliases).
    kernel[grid](*inputs, *outputs, *outputs, num_warps=num_warps, num_stages=num_stages,
                 **constants)
    return tuple(outputs)


def call_interpreted(run: Callable[..., Any], out_shape: tuple[tuple[int, ...], str],
                     *arrays: jax.Array) -> jax.Array:
    """``run(interpreter_launch, *tensors)`` on the host, `arrays` given to it as torch tensors,
    inside :func:`interpreter_scope`; usable under jax.jit. `run` returns one torch tensor of
    `out_shape` = (shape, dtype name), which is the result."""

    def on_host(*host_arrays):
        tensors = [to_torch(np.asarray(array)) for array in host_arrays]
        with interpreter_scope():
            return to_numpy(run(interpreter_launch, *tensors))

    check_interpreter_threads("Triton's interpreter")
    shape, dtype = out_shape
    return jax.pure_callback(on_host, out_struct(shape, dtype, arrays), *arrays)


def gpu_launch(compute_capability: int | None) -> Launch:
    """The GPU launch function: jax-triton calls whose outputs start NaN-filled (aliased), so
    an element a kernel forgets to write shows. `compute_capability` (e.g. 90) is needed only
    when there is no local GPU to read it from."""
    import jax_triton

    def launch(kernel, grid, inputs, out_shapes, constants, num_warps, num_stages):
        poisoned = [jnp.full(shape, jnp.nan, dtype) for shape, dtype in out_shapes]
        # jax-triton numbers aliases among the array arguments only (ints are scalars).
        arrays = sum(not isinstance(value, int) for value in inputs)
        outputs = jax_triton.triton_call(
            *inputs, *poisoned, kernel=kernel, grid=grid,
            out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_shapes],
            input_output_aliases={arrays + i: i for i in range(len(out_shapes))},
            num_warps=num_warps, num_stages=num_stages,
            compute_capability=compute_capability, **constants)
        return tuple(outputs)

    return launch
