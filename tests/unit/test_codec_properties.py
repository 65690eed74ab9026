"""Property-based tests of adapter format v1: exact round trips over residual dtypes and sparsity
patterns, and a byte-mutation fuzz of the decoder (it may accept or raise InvalidAdapter, nothing
else).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters_store.adapter import Adapter, AdapterInfo, build_adapter, merge_state
from adapters_store.errors import InvalidAdapter
from adapters_store.format.codec import decode_adapter, encode_adapter
from adapters_store.head import TaskHead

RESIDUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view(
            {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
        )
    return t


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{what}: values differ"


def assert_adapters_equal(a: Adapter, b: Adapter) -> None:
    assert a.meta == b.meta
    assert sorted(a.residual) == sorted(b.residual)
    for key in a.residual:
        assert_bitwise_equal(a.residual[key].indices, b.residual[key].indices, f"{key} indices")
        assert_bitwise_equal(a.residual[key].values, b.residual[key].values, f"{key} values")
    assert sorted(a.head) == sorted(b.head)
    for key in a.head:
        assert_bitwise_equal(a.head[key], b.head[key], f"head/{key}")
    assert (a.class_embeddings is None) == (b.class_embeddings is None)
    if a.class_embeddings is not None and b.class_embeddings is not None:
        assert_bitwise_equal(a.class_embeddings, b.class_embeddings, "class_embeddings")


# ------------------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class Case:
    adapter: Adapter
    base: dict[str, torch.Tensor]
    task: dict[str, torch.Tensor]
    residual_dtype: torch.dtype


def _states(
    seed: int, density: float, shapes: list[tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Seeded float32 base weights (some exact zeros) and a task that changes about ``density``
    of them, each changed weight staying within a factor of 2 of its base weight (so the float32
    residual is exact, by Sterbenz); zero base weights get a small additive change."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    task: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        key = f"visual.block{i}.weight"
        w = torch.randn(shape, generator=g) * 10.0 ** float(torch.randint(-4, 2, (), generator=g))
        w = torch.where(torch.rand(shape, generator=g) < 0.05, torch.zeros(shape), w)
        changed = torch.rand(shape, generator=g) < density
        factor = 0.5 + 1.5 * torch.rand(shape, generator=g)  # [0.5, 2.0)
        additive = torch.randn(shape, generator=g) * 1e-3
        moved = torch.where(w == 0, additive, w * factor)
        base[key] = w
        task[key] = torch.where(changed, moved, w)
    return base, task


_text = st.text(max_size=12)
_json_scalar = st.one_of(
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
    st.booleans(),
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.0, 0.2))
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
        )
    )
    residual_dtype = draw(st.sampled_from(RESIDUAL_DTYPES))
    dim = draw(st.integers(1, 8))
    class_names = draw(
        st.lists(
            st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=5, unique=True
        )
    )
    base, task = _states(seed, density, shapes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TaskHead(dim, len(class_names)).state_dict()
        emb = torch.nn.functional.normalize(torch.randn(len(class_names), dim), dim=1)
    created = draw(st.datetimes(timezones=st.just(dt.UTC))).replace(microsecond=0)
    adapter = build_adapter(
        base,
        task,
        AdapterInfo(
            task=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True)),
            base_model=draw(_text),
            base_pretrained=draw(_text),
            base_fingerprint=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
            class_names=class_names,
            source_domain=draw(_text),
            target_domain=draw(_text),
            method=draw(_text),
            train_config=draw(st.dictionaries(_text, _json_scalar, max_size=3)),
            metrics=draw(st.dictionaries(_text, _json_scalar, max_size=3)),
            created_at=created.isoformat().replace(
                "+00:00", draw(st.sampled_from(["Z", "+00:00"]))
            ),
        ),
        head_state=head,
        residual_dtype=residual_dtype,
        class_embeddings=emb if draw(st.booleans()) else None,
    )
    return Case(adapter, base, task, residual_dtype)


# ---------------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(cases())
def test_round_trip_is_exact(case: Case) -> None:
    a = case.adapter
    event(f"residual {a.meta.residual_dtype}, {'empty' if a.meta.nnz == 0 else 'non-empty'}")
    b = decode_adapter(encode_adapter(a))
    assert_adapters_equal(a, b)

    # the residual is well formed and lists only weights that really changed
    assert a.meta.nnz == sum(r.nnz for r in a.residual.values())
    for key, res in a.residual.items():
        assert res.indices.dtype == torch.int32 and res.values.dtype == case.residual_dtype
        assert res.nnz > 0 and bool((res.indices[1:] > res.indices[:-1]).all())
        assert bool((res.values != 0).all())
        idx = res.indices.long()
        assert bool((case.task[key].reshape(-1)[idx] != case.base[key].reshape(-1)[idx]).all())

    merged_original = merge_state(case.base, a)
    merged_decoded = merge_state(case.base, b)
    assert sorted(merged_decoded) == sorted(case.base)
    for key in case.base:
        assert_bitwise_equal(merged_decoded[key], merged_original[key], key)
        unlisted = torch.ones(case.base[key].numel(), dtype=torch.bool)
        if key in b.residual:
            unlisted[b.residual[key].indices.long()] = False
        assert_bitwise_equal(
            merged_decoded[key].reshape(-1)[unlisted], case.base[key].reshape(-1)[unlisted], key
        )
    if case.residual_dtype == torch.float32:
        changed = sum(int((case.task[k] != case.base[k]).sum()) for k in case.base)
        assert a.meta.nnz == changed
        for key in case.task:
            assert_bitwise_equal(merged_decoded[key], case.task[key], f"task weights {key}")


# -------------------------------------------------------------------------------------- fuzz


@functools.cache
def _valid_file() -> bytes:
    base, task = _states(11, 0.3, [(4, 5), (7,)])
    head = TaskHead(3, 2).state_dict()
    adapter = build_adapter(
        base,
        task,
        AdapterInfo(
            task="fuzz",
            base_model="m",
            base_pretrained="p",
            base_fingerprint="cd" * 32,
            class_names=["a", "b"],
            created_at="2024-05-01T12:00:00Z",
        ),
        head_state=head,
        class_embeddings=torch.eye(2, 3),
    )
    data = encode_adapter(adapter)
    decode_adapter(data)  # the unmutated file is valid
    return data


# non-negative: from the start (mostly the JSON header); negative: from the end (tensor data)
_position = st.one_of(st.integers(0, 10_000), st.integers(-300, -1))
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("insert"), _position, st.integers(0, 255)),
    st.tuples(st.just("delete"), _position, st.integers(1, 16)),
    st.tuples(st.just("truncate"), _position, st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, position, arg in mutations:
        pos = position % (len(buf) + 1) if position >= 0 else max(0, len(buf) + position)
        if op == "insert":
            buf[pos:pos] = bytes([arg])
        elif op == "truncate":
            del buf[pos:]
        elif pos < len(buf):
            if op == "flip":
                buf[pos] ^= 1 << arg
            elif op == "set":
                buf[pos] = arg
            else:
                del buf[pos : pos + arg]
    return bytes(buf)


@settings(max_examples=200, deadline=None)
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_decoder_fuzz_accepts_or_raises_invalid_adapter(
    mutations: list[tuple[str, int, int]],
) -> None:
    data = _mutate(_valid_file(), mutations)
    try:
        adapter = decode_adapter(data)
    except InvalidAdapter as exc:
        event(f"rejected: {exc.rule}")
        assert exc.rule and str(exc).startswith(f"[{exc.rule}] ")
    else:
        event("accepted")
        assert isinstance(adapter, Adapter)
        assert adapter.meta.nnz == sum(r.nnz for r in adapter.residual.values())
