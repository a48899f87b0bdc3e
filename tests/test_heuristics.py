"""The CPU variants' heuristic defaults: the measured rules, valid on every shape, correct."""

import itertools

import pytest
from checks import run_and_compare

from attnbench.kernels import DecodeShape, registry
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.paged.problem import PagedProblem

CPU_VARIANTS = [("decode", "xla_blocked"), ("decode", "cpu_native"), ("paged", "xla_decode"),
                ("paged", "xla_blocked"), ("paged", "cpu_native")]


def decode_shape(batch=8, max_len=4096, q_heads=32, kv_heads=8, head_dim=128, features=()):
    return DecodeShape(batch=batch, max_len=max_len, q_heads=q_heads, kv_heads=kv_heads,
                       head_dim=head_dim, dtype="bfloat16", features=frozenset(features))


def paged_shape(page_size=16, head_dim=128, kv_heads=8, tokens=8, max_len=4096):
    return registry.get_operator("paged").lookup_shape(
        q_heads=4 * kv_heads, kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16",
        features=frozenset(), sizes={"max_len": max_len, "tokens": tokens,
                                     "page_size": page_size})


def config_of(op, variant, shape):
    return registry.get_variant(op, variant).default_config(shape)


def test_decode_blocks_span_the_same_bytes_whatever_the_heads():
    xla = lambda **kw: config_of("decode", "xla_blocked", decode_shape(**kw))  # noqa: E731
    assert (xla().kv_block_size, xla().blocks_per_step) == (1024, 1)  # Llama-3-8B
    mha = xla(kv_heads=32)
    assert (mha.kv_block_size, mha.blocks_per_step, mha.contraction) == (256, 2, "key_major_dot")
    assert xla(q_heads=16, head_dim=256).kv_block_size == 512  # Gemma-2
    assert xla(features=("sliding_window",)).kv_block_size == 512
    assert xla(batch=1, max_len=2048).kv_block_size == 256  # few blocks: both cores get some
    mqa = xla(q_heads=48, kv_heads=1)
    assert (mqa.kv_block_size, mqa.contraction) == (2048, "head_major_dot")
    native = lambda d: config_of("decode", "cpu_native", decode_shape(head_dim=d))  # noqa: E731
    assert [native(d).kv_block_size for d in (64, 128, 256)] == [128, 64, 32]


def test_paged_decode_steps_cover_512_positions():
    blocks = {page: config_of("paged", "xla_decode", paged_shape(page_size=page))
              for page in (8, 16, 32, 64)}
    assert {page: (c.kv_pages_per_block, c.blocks_per_step) for page, c in blocks.items()} == {
        8: (16, 4), 16: (16, 2), 32: (16, 1), 64: (8, 1)}
    assert config_of("paged", "cpu_native", paged_shape(head_dim=256)).kv_block_size == 32


@pytest.mark.parametrize("op, variant", CPU_VARIANTS)
def test_defaults_are_valid_for_many_shapes(op, variant):
    for batch, max_len, kv_heads, head_dim, features in itertools.product(
            (1, 3, 64), (1, 100, 8192, 100_000), (1, 4, 32), (64, 256),
            ((), ("sliding_window",))):
        if op == "decode":
            shape = decode_shape(batch, max_len, 4 * kv_heads, kv_heads, head_dim, features)
        else:
            shape = paged_shape(page_size=16 if max_len > 1 else 1, head_dim=head_dim,
                                kv_heads=kv_heads, tokens=batch, max_len=max_len)
        config = config_of(op, variant, shape)
        assert config.invalid_reason(shape) is None, (shape, config)


@pytest.mark.parametrize("problem", [
    # MHA: 256-position blocks, two per step; windowed GQA: halved blocks.
    DecodeProblem(batch=2, max_len=700, q_heads=4, kv_heads=4, head_dim=64),
    DecodeProblem(batch=3, max_len=1200, q_heads=8, kv_heads=2, head_dim=64,
                  sliding_window=300),
    PagedProblem(num_seqs=3, max_len=600, q_heads=6, kv_heads=2, head_dim=64, page_size=8),
], ids=["decode-mha", "decode-window", "paged-page8"])
def test_new_defaults_match_the_reference(problem):
    variant = "xla_blocked" if problem.op == "decode" else "xla_decode"
    run_and_compare(problem, variant, seed=0)
