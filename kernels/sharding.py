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

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .inputs import as_int32
from .jax_compat import is_tracer


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


def shard_operator(operator, arrays: Sequence[Any], kwargs: dict[str, Any], *, mesh: Any,
                   in_specs: Any, out_specs: Any, head_axis: str | None,
                   validate: bool, **choice: Any) -> jax.Array:
    """`operator`'s public function run per shard of `mesh` through ``jax.shard_map``.

    The arguments are checked whole first (errors name them as an unsharded call would;
    ``validate=True`` checks the values whole too). `in_specs` gives one PartitionSpec per
    array argument (sinks excluded), `out_specs` the output's; either defaults to
    :meth:`Operator.shard_specs`, which splits heads over `head_axis` (default: the mesh's
    only axis, or its axis named "tp"). Sinks, in any accepted form, are reduced to one
    logit per query head here and split like the query heads. Inside, each shard calls
    the operator on its own arrays, so the variant and config are looked up for the
    per-shard shape, once per trace.
    """
    # Imported here: run reaches the registry, whose variant modules import this module.
    from .run import check_values

    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    prepared, shape = operator.prepare(*arrays, **kwargs)
    names = operator.array_names
    # The shards get int32 index arrays: a wider one is checked for overflow here, whole
    # (shard_map's transfer would cast it silently).
    arrays = [as_int32(name, a) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.integer)
              else a if hasattr(a, "shape") else jnp.asarray(a)
              for name, a in zip(names, arrays)]
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
    out_specs = _check_spec("out_specs", out_specs, None)
    sinks = getattr(prepared, "sinks", None)  # float32 [Hq] when given
    if sinks is not None:
        arrays.append(sinks)
        specs.append(PartitionSpec(operator.head_entry(specs, arrays)))
    placed = [_place(array, mesh, spec) for array, spec in zip(arrays, specs)]
    call_kwargs = {k: v for k, v in kwargs.items() if k != "sinks"}

    def per_shard(*shards):
        if sinks is not None:
            *shards, shard_sinks = shards
            call_kwargs["sinks"] = shard_sinks
        return operator.function(*shards, **call_kwargs, validate=False, **choice)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                         out_specs=out_specs)(*placed)
