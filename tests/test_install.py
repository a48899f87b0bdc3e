"""Installing beside the user's JAX: ranges, not pins, and one module for moved JAX APIs."""

from __future__ import annotations

import re
import tomllib
import types
from pathlib import Path

import jax
import pytest

from attnbench.kernels import jax_compat

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement(text: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?", text).group(0)
    return name.lower(), text[len(name):].strip()


def test_jax_is_a_range_and_the_gpu_extra_brings_no_cuda_plugin():
    requirements = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"] + \
        PROJECT["optional-dependencies"]["tpu"]
    for name, spec in map(_requirement, requirements):
        if name.startswith(("jax", "triton")):
            assert "==" not in spec and ">=" in spec, f"{name}{spec} would replace the user's"
    gpu = [_requirement(r)[0] for r in PROJECT["optional-dependencies"]["gpu"]]
    assert not [n for n in gpu if "cuda" in n or "pjrt" in n], gpu
    assert {"jax-triton", "triton"} <= set(gpu)
    lowest = (REPO / ".ci" / "lowest.txt").read_text()
    jax_range = dict(map(_requirement, PROJECT["dependencies"]))["jax"]
    assert "jax==0.10.2" in lowest and ">=0.10.2" in jax_range
    assert jax.__version__ >= "0.10.2"


def test_version_dependent_jax_apis_go_through_the_compat_module():
    """Outside kernels/jax_compat.py no module spells the APIs that moved between JAX
    releases."""
    moved = re.compile(r"jax\.core\.Tracer|pltpu\.(TPU)?CompilerParams|jax\._src\b")
    offenders = []
    for path in list(REPO.glob("kernels/**/*.py")) + list(REPO.glob("tuner/**/*.py")) + [REPO / "cli.py"]:
        if path.name == "jax_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if moved.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_compat_accessors_work_on_this_jax_and_on_the_older_spelling(monkeypatch):
    assert jax_compat.is_tracer(jax.numpy.ones(2)) is False
    seen = []
    jax.jit(lambda a: seen.append(jax_compat.is_tracer(a)) or a)(jax.numpy.ones(2))
    assert seen == [True]
    assert isinstance(jax_compat.backends_initialized(), bool)
    from jax.experimental.pallas import tpu as pltpu

    params = jax_compat.tpu_compiler_params(dimension_semantics=("parallel",))
    assert params.dimension_semantics == ("parallel",)
    # A release that spells it TPUCompilerParams.
    older = types.SimpleNamespace(TPUCompilerParams=lambda **fields: ("old", fields))
    import jax.experimental.pallas as pallas

    monkeypatch.setattr(pallas, "tpu", older)
    assert jax_compat.tpu_compiler_params(a=1) == ("old", {"a": 1})
    assert pltpu is not older


def test_module_name_of_a_compiled_call():
    compiled = jax.jit(lambda a: a + 1).lower(jax.numpy.ones(3)).compile()
    assert jax_compat.hlo_module_name(compiled).startswith("jit_")
    with pytest.raises(ValueError, match="names no module"):
        jax_compat.hlo_module_name(types.SimpleNamespace(as_text=lambda: ""))
