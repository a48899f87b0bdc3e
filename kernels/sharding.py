"""Running the operators per shard: inside ``jax.shard_map`` and through its mesh keywords.

Inside ``shard_map`` every value carries the set of mesh axes it varies over (its manual
axis type). A loop carry that starts as a constant (``jnp.zeros``) varies over none, while
the loop body mixes it with sharded inputs and returns it varying; JAX refuses such a loop.
Likewise a Pallas or callback output declared by a bare ``ShapeDtypeStruct`` has no axes.
The kernels therefore start their carries with :func:`vary_like` and declare outputs with
:func:`out_struct`; both are no-ops outside ``shard_map``.

:func:`shard_operator` is what the operators' ``mesh=`` keyword runs: the call wrapped in
``shard_map`` with the operator's default partition specs (heads over one named axis); a
new operator gets the keywords by calling it and answering ``Operator.shard_specs``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .inputs import as_int32
from .jax_compat import is_tracer
from .variant import UnsupportedError


def varying_axes(*trees: Any) -> frozenset[str]:
    """The mesh axes any array leaf of `trees` varies over (empty outside shard_map)."""
    axes: frozenset[str] = frozenset()
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array) or is_tracer(leaf):
            axes |= jax.typeof(leaf).mat.varying
    return axes


def vary(tree: Any, axes: frozenset[str]) -> Any:
    """`tree` with every array leaf cast to vary over `axes` as well (a type-level cast)."""
    if not axes:
        return tree

    def cast(leaf):
        missing = tuple(sorted(axes - jax.typeof(leaf).mat.varying))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def vary_like(tree: Any, *refs: Any) -> Any:
    """A loop's initial carry made to vary over every axis its inputs `refs` vary over.

    A body combining the carry with those inputs returns values varying over exactly that
    union, so the carry's type is a fixed point of the loop.
    """
    return vary(tree, varying_axes(*refs))


def out_struct(shape: Sequence[int], dtype: Any, *refs: Any) -> jax.ShapeDtypeStruct:
    """The declared output of a Pallas call or callback computed from `refs`: it varies over
    the axes they vary over (inside shard_map such a declaration must say so)."""
    axes = varying_axes(*refs)
    if not axes:
        return jax.ShapeDtypeStruct(tuple(shape), dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=axes))


def cpu_runtime_threads() -> int:
    """The threads of XLA's CPU client pool: $PJRT_NPROC, else $NPROC, else the CPUs this
    process may run on (read when JAX starts its CPU backend)."""
    for name in ("PJRT_NPROC", "NPROC"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_interpreter_threads(kernel: str) -> None:
    """Refuses an interpreted kernel (`interpret=True`) per shard of a CPU mesh that XLA's CPU
    client has too few threads for, instead of letting it hang.

    The interpreters run each device's kernel as host callbacks, and JAX first copies a
    callback's operands to CPU device 0. From 100 KiB on, the CPU client makes that copy on
    its thread pool; when every pool thread runs a device that waits inside such a callback,
    the copy never runs and the call hangs. Devices < threads leaves one free.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size < 2 or not mesh.manual_axes:  # not inside shard_map
        return
    if getattr(getattr(mesh, "abstract_device", None), "platform", "cpu") != "cpu":
        return
    threads = cpu_runtime_threads()
    if mesh.size >= threads:
        raise UnsupportedError(
            f"{kernel} with interpret=True per shard of {mesh.size} CPU devices needs more "
            f"threads in XLA's CPU client than devices, and it has {threads} (PJRT_NPROC, else "
            "the CPUs): each device's kernel waits in host callbacks whose operands JAX copies "
            f"on that pool, so the call could hang. Set PJRT_NPROC={mesh.size + 1} (or more) "
            "in the environment before JAX starts.")


def _check_spec(name: str, spec: Any, rank: int | None) -> PartitionSpec:
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{name} must be a jax.sharding.PartitionSpec, got {type(spec).__name__}")
    if rank is not None and len(spec) > rank:
        raise ValueError(f"{name} = {spec} names {len(spec)} axes for an array of rank {rank}")
    return spec


def _place(array: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
    """`array` laid out as `spec` says when the spec names Explicit mesh axes (shard_map does
    not move such arrays itself); Auto axes are resharded by shard_map."""
    named = {axis for part in spec if part is not None
             for axis in ((part,) if isinstance(part, str) else part)}
    if not named or any(mesh.axis_types[mesh.axis_names.index(a)] != AxisType.Explicit
                        for a in named):
        return array
    return jax.sharding.reshard(array, NamedSharding(mesh, spec))


def no_specs_without_mesh(in_specs: Any, out_specs: Any, head_axis: Any) -> None:
    """Sharding keywords without a mesh would be ignored: refused instead."""
    for name, value in (("in_specs", in_specs), ("out_specs", out_specs),
                        ("head_axis", head_axis)):
        if value is not None:
            raise ValueError(f"{name} needs mesh= (the call runs per shard only with a mesh)")


def _default_axis(mesh: Any, axis: str | None) -> str:
    if axis is None:
        if len(mesh.axis_names) == 1:
            return mesh.axis_names[0]
        if "tp" in mesh.axis_names:
            return "tp"
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}: pass in_specs and out_specs, "
                         "or name the axis the heads are split over with head_axis=")
    if axis not in mesh.axis_names:
        raise ValueError(f"head_axis {axis!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    return axis


def _entries(spec: PartitionSpec, rank: int) -> tuple:
    return tuple(spec) + (None,) * (rank - len(spec))


def _shards(mesh: Any, entry: Any) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    count = 1
    for axis in axes:
        count *= mesh.shape[axis]
    return count


def split_problems(names: Sequence[str], arrays: Sequence[Any], specs: Sequence[PartitionSpec],
                   mesh: Any, notes: dict[str, str]) -> list[str]:
    """Every array axis `specs` split over shards that do not divide it, one sentence each
    (shard_map would refuse them with a message that names no argument); `notes` adds
    what an argument's layout needs of a split."""
    problems = []
    for i, (name, array, spec) in enumerate(zip(names, arrays, specs)):
        for axis, entry in enumerate(_entries(spec, array.ndim)):
            count = _shards(mesh, entry)
            if array.shape[axis] % count:
                note = f" ({notes[name]})" if name in notes else ""
                problems.append(f"in_specs[{i}] ({name}) = {spec} splits axis {axis} of size "
                                f"{array.shape[axis]} over {count} shards, which do not divide "
                                f"it{note}")
    return problems


def _check_out_specs(operator, out_specs: Any) -> Any:
    """One PartitionSpec per output: the attention output, then each extra output."""
    extras = operator.extra_names()
    if not extras:
        return _check_spec("out_specs", out_specs, None)
    names = ("output",) + tuple(extras)
    if not isinstance(out_specs, (tuple, list)) or isinstance(out_specs, PartitionSpec) \
            or len(out_specs) != len(names):
        raise ValueError(f"out_specs must be a sequence of {len(names)} PartitionSpecs, one "
                         f"per output ({', '.join(names)}), got {out_specs!r}")
    return tuple(_check_spec(f"out_specs[{i}] ({name})", spec, None)
                 for i, (name, spec) in enumerate(zip(names, out_specs)))


def _wide_integer(array: Any) -> bool:
    return (hasattr(array, "dtype") and jnp.issubdtype(array.dtype, jnp.integer)
            and jnp.dtype(array.dtype).itemsize >= 4)


def shard_operator(operator, arrays: Sequence[Any], kwargs: dict[str, Any], *, mesh: Any,
                   in_specs: Any, out_specs: Any, head_axis: str | None,
                   validate: bool, **choice: Any) -> Any:
    """`operator`'s public function run per shard of `mesh` through ``jax.shard_map``.

    The arguments are checked whole first (errors name them as an unsharded call would;
    ``validate=True`` checks the values whole too). `in_specs` gives one PartitionSpec per
    array argument (sinks excluded), `out_specs` the output's (one per output for an
    operator with extra outputs, such as an updated cache); either defaults to
    :meth:`Operator.shard_specs`, which splits heads over `head_axis` (default: the mesh's
    only axis, or its axis named "tp"). Sinks, in any accepted form, are reduced to one
    logit per query head here and split like the query heads; other array keywords (a
    cache's scales) are replicated. Inside, each shard calls the operator on its own
    arrays, so the variant and config are looked up for the per-shard shape, once per trace.
    """
    # Imported here: run reaches the registry, whose variant modules import this module.
    from .run import check_values

    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    prepared, shape = operator.prepare(*arrays, **kwargs)
    names = operator.array_names
    # The shards get int32 index arrays: a wider one is checked for overflow here, whole
    # (shard_map's transfer would cast it silently). Narrower integers (an int8 cache) stay.
    arrays = [as_int32(name, a) if _wide_integer(a) else a if hasattr(a, "shape")
              else jnp.asarray(a) for name, a in zip(names, arrays)]
    if validate:
        check_values(operator, shape, operator.value_arrays(prepared))
    if in_specs is None or out_specs is None:
        default_in, default_out = operator.shard_specs(_default_axis(mesh, head_axis), arrays)
        in_specs = default_in if in_specs is None else in_specs
        out_specs = default_out if out_specs is None else out_specs
    if not isinstance(in_specs, (tuple, list)) or len(in_specs) != len(arrays):
        raise ValueError(f"in_specs must be a sequence of {len(arrays)} PartitionSpecs, one per "
                         f"array argument ({', '.join(names)}; sinks follow the query heads), "
                         f"got {in_specs!r}")
    specs = [_check_spec(f"in_specs[{i}] ({names[i]})", spec, arrays[i].ndim)
             for i, spec in enumerate(in_specs)]
    out_specs = _check_out_specs(operator, out_specs)
    problems = split_problems(names, arrays, specs, mesh, operator.split_notes)
    if problems:
        raise ValueError(f"{operator.function_name} over mesh {dict(mesh.shape)}: "
                         + "; ".join(problems))
    sinks = getattr(prepared, "sinks", None)  # float32 [Hq] when given
    call_kwargs = {k: v for k, v in kwargs.items() if k != "sinks"}
    # Array keywords travel as replicated inputs (a closed-over array would be a constant
    # of every shard's program, or a tracer of the enclosing jit leaking into shard_map).
    array_keywords = [k for k, v in call_kwargs.items() if hasattr(v, "shape")]
    for name in array_keywords:
        arrays.append(jnp.asarray(call_kwargs.pop(name)))
        specs.append(PartitionSpec())
    if sinks is not None:
        arrays.append(sinks)
        specs.append(PartitionSpec(operator.head_entry(specs, arrays)))
    placed = [_place(array, mesh, spec) for array, spec in zip(arrays, specs)]
    positional = len(names)

    def per_shard(*shards):
        keywords = dict(call_kwargs)
        rest = list(shards[positional:])
        for name in array_keywords:
            keywords[name] = rest.pop(0)
        if sinks is not None:
            keywords["sinks"] = rest.pop(0)
        return operator.function(*shards[:positional], **keywords, validate=False, **choice)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                         out_specs=out_specs)(*placed)
