"""PEDRO gather-scale ops vs a naive per-token oracle: torch backend, Triton (interpreted on
the CPU, compiled on a GPU), and on a GPU the CUDA op plus CUDA-graph capture."""

import importlib.util
import logging
import os

import pytest
import torch

# Triton has no CPU backend: interpret it. Only without a GPU, so a GPU run tests compiled
# kernels. (vllm_pedro.ops.triton_kernels re-decorates if the mode changes after import.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_pedro import ops  # noqa: E402
from vllm_pedro.ops import cuda as ops_cuda  # noqa: E402
from vllm_pedro.ops import reference  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [576, 1536, 4096, 11008, 13, 1000]
S = 5  # slots


def _backends():
    out = ["torch"]
    if HAS_TRITON and INTERPRET:
        out.append("triton")
    return out


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, request.param)
    return request.param


# ---- independent oracle: a Python loop over tokens ----

def oracle_scale(x, vectors, slots, ranges):
    """ranges: [(start, size, col)]; col < 0 = range not scaled."""
    out = x.clone()
    for t in range(x.shape[0]):
        s = int(slots[t])
        for start, size, col in ranges:
            if col >= 0 and size > 0:
                prod = x[t, start:start + size].float() * vectors[s, col:col + size].float()
                out[t, start:start + size] = prod.to(x.dtype)
    return out


def oracle_silu(gate_up, vectors, slots, col, transformers_order=False):
    """silu(gate) * up * v per token. GPU kernels: fp32 math, one rounding. The torch
    reference (transformers_order): the transformers model's order, U' = up * v rounded to
    the dtype, then silu(gate) and the product each rounded, so l_u = 1 is vLLM's native
    SiluAndMul bit for bit."""
    T, D = gate_up.shape[0], gate_up.shape[1] // 2
    dt = gate_up.dtype
    out = torch.empty(T, D, dtype=dt)
    for t in range(T):
        g, u = gate_up[t, :D].float(), gate_up[t, D:].float()
        s = int(slots[t])
        if transformers_order:
            if col >= 0:
                u = (u * vectors[s, col:col + D].float()).to(dt).float()
            silu = (g / (1 + torch.exp(-g))).to(dt).float()
            out[t] = (silu * u).to(dt)
            continue
        y = g / (1 + torch.exp(-g)) * u
        if col >= 0:
            y = y * vectors[s, col:col + D].float()
        out[t] = y.to(dt)
    return out


# ---- inputs ----

ONES = S - 1  # the row of ones that base-model tokens point at


def make_slots(T, gen, dtype=torch.int32, extra=4):
    """T live entries (the ones row mixed in), then a tail the ops must not read (out of range)."""
    live = torch.randint(0, S, (T,), generator=gen)
    if T >= 2:
        live[0], live[1] = ONES, 0
    tail = torch.full((extra,), S + 100)
    return torch.cat([live, tail]).to(dtype)


def make_vectors(width, dtype, gen, device="cpu"):
    """[S, width] view of a bigger [S, 3, width] buffer: row stride 3*width, not contiguous.
    Row ONES is all ones."""
    big = (1 + 0.5 * torch.randn(S, 3, width, generator=gen)).to(dtype).to(device)
    big[ONES] = 1
    return big[:, 1, :]


def make_rows(T, width, dtype, gen, pad=3):
    """[T, width] view with row stride width+pad; the pad must never change."""
    buf = torch.randn(T, width + pad, generator=gen).to(dtype)
    return buf, buf[:, :width]


def check(actual, expected, dtype, backend, exact):
    if exact and not (dtype == torch.bfloat16 and backend == "triton" and INTERPRET):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    elif exact:
        # Triton's interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest
        # even): allow one bf16 ulp.
        torch.testing.assert_close(actual, expected, atol=0, rtol=2 ** -7)
    else:
        torch.testing.assert_close(actual, expected)  # dtype-default tolerances


# ---- correctness ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_scale(backend, dtype, width):
    gen = torch.Generator().manual_seed(width)
    T = 1 + width % 5
    col = 7  # unaligned vector column offset
    vectors = make_vectors(col + width + 2, dtype, gen)
    slots = make_slots(T, gen, torch.int64 if width % 2 else torch.int32)
    buf, x = make_rows(T, width, dtype, gen)
    before = buf.clone()
    expected = oracle_scale(x, vectors, slots, [(0, width, col)])
    ops.scale_(x, vectors, slots, col)
    check(x, expected, dtype, backend, exact=True)
    assert torch.equal(buf[:, width:], before[:, width:])
    for t in range(T):  # base-model tokens: bit-identical
        if slots[t] == ONES:
            assert torch.equal(buf[t], before[t])


QKV = [(576, 192), (4096, 1024), (13, 5), (1000, 1000), (64, 0)]
COLS = [(True, False, True), (True, True, True), (False, True, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q,kv", QKV)
@pytest.mark.parametrize("on", COLS, ids=["qv", "qkv", "k"])
def test_scale_qkv(backend, dtype, q, kv, on):
    gen = torch.Generator().manual_seed(q + kv)
    T = 1 + (q + kv) % 4
    n = q + 2 * kv
    # Vector layout [q | v | k] with a leading gap, so every range has its own offset.
    cols = (3, 3 + q + kv, 3 + q)
    cols = tuple(c if o else -1 for c, o in zip(cols, on))
    vectors = make_vectors(3 + q + 2 * kv, dtype, gen)
    slots = make_slots(T, gen)
    buf, qkv = make_rows(T, n, dtype, gen)
    before = buf.clone()
    ranges = [(0, q, cols[0]), (q, kv, cols[1]), (q + kv, kv, cols[2])]
    expected = oracle_scale(qkv, vectors, slots, ranges)
    ops.scale_qkv_(qkv, vectors, slots, q, kv, *cols)
    check(qkv, expected, dtype, backend, exact=True)
    assert torch.equal(buf[:, n:], before[:, n:])
    for start, size, col in ranges:  # ranges switched off: bit-identical
        if col < 0:
            assert torch.equal(buf[:, start:start + size], before[:, start:start + size])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_silu_and_mul_scaled(backend, dtype, width):
    gen = torch.Generator().manual_seed(width + 1)
    T = 1 + width % 4
    col = 5
    vectors = make_vectors(col + width, dtype, gen)
    slots = make_slots(T, gen, torch.int64 if width % 2 else torch.int32)
    gate_up = (2 * torch.randn(T, 2 * width, generator=gen)).to(dtype)
    order = backend == "torch"
    expected = oracle_silu(gate_up, vectors, slots, col, order)
    # Given out: strided and poisoned, so every element must be written and the pad kept.
    buf = torch.full((T, width + 3), float("nan"), dtype=dtype)
    out = buf[:, :width]
    ret = ops.silu_and_mul_scaled(gate_up, vectors, slots, col, out=out)
    assert ret.data_ptr() == out.data_ptr()
    check(out, expected, dtype, backend, exact=False)
    assert torch.isnan(buf[:, width:]).all()
    # No out: allocated.
    check(ops.silu_and_mul_scaled(gate_up, vectors, slots, col), expected, dtype, backend, False)
    # col < 0: plain SiluAndMul for every token.
    check(ops.silu_and_mul_scaled(gate_up, vectors, slots, -1),
          oracle_silu(gate_up, vectors, slots, -1, order), dtype, backend, False)


def test_empty_batch(backend):
    for dtype in DTYPES:
        vectors = torch.ones(S, 64, dtype=dtype)
        slots = torch.zeros(8, dtype=torch.int32)  # longer than T = 0
        ops.scale_(torch.empty(0, 16, dtype=dtype), vectors, slots, 0)
        ops.scale_qkv_(torch.empty(0, 24, dtype=dtype), vectors, slots[:0], 8, 8, 0, 8, 16)
        out = ops.silu_and_mul_scaled(torch.empty(0, 32, dtype=dtype), vectors, slots, 0)
        assert out.shape == (0, 16) and out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_base_tokens_keep_their_bits(backend, dtype):
    """No adapter request in the batch: every token points at the row of ones, and every
    op leaves it exactly as the base model computes it."""
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(6, 40, generator=gen)).to(dtype)
    before = x.clone()
    ones = torch.ones(1, 60, dtype=dtype)
    slots = torch.zeros(6, dtype=torch.int32)
    ops.scale_(x, ones, slots, 20)
    ops.scale_qkv_(x, ones, slots, 20, 10, 0, 20, 40)
    assert torch.equal(x, before)
    gate_up = (3 * torch.randn(6, 40, generator=gen)).to(dtype)
    plain = ops.silu_and_mul_scaled(gate_up, ones, slots, -1)
    assert torch.equal(ops.silu_and_mul_scaled(gate_up, ones, slots, 0), plain)
    if backend == "torch":  # vLLM's native SiluAndMul on the CPU, bit for bit
        d = 20
        assert torch.equal(plain, torch.nn.functional.silu(gate_up[:, :d]) * gate_up[:, d:])


def test_validation():
    v = torch.ones(S, 32)
    s = torch.zeros(4, dtype=torch.int32)
    bad = [
        lambda: ops.scale_qkv_(torch.ones(4, 30), v, s, 8, 8, 0, -1, 8),  # width != q+2kv
        lambda: ops.scale_qkv_(torch.ones(4, 24), v, s, 8, 8, 0, -1, 30),  # v beyond vectors
        lambda: ops.scale_(torch.ones(4, 8, dtype=torch.float16), v, s, 0),  # dtype mismatch
        lambda: ops.scale_(torch.ones(4, 8), v, s.float(), 0),  # float slots
        lambda: ops.scale_(torch.ones(5, 8), v, s, 0),  # too few slots
        lambda: ops.scale_(torch.ones(8, 4).t(), v, s, 0),  # last dim not contiguous
        lambda: ops.scale_(torch.ones(4, 8, dtype=torch.float64), v.double(), s, 0),
        lambda: ops.scale_(torch.ones(4, 8), v, s.view(2, 2), 0),
        lambda: ops.silu_and_mul_scaled(torch.ones(4, 9), v, s, 0),  # odd width
        lambda: ops.silu_and_mul_scaled(torch.ones(4, 8), v, s, 0, out=torch.empty(4, 5)),
        lambda: ops.silu_and_mul_scaled(torch.ones(4, 80), v, s, 0),  # up beyond vectors
    ]
    for i, f in enumerate(bad):
        with pytest.raises(ValueError):
            f()
            pytest.fail(f"case {i} did not raise")


# ---- backend selection ----

def test_backend_auto_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert ops.backend_name("cpu") == "torch"
    assert ops.backend_name(torch.device("cpu")) == "torch"


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    assert ops.backend_name("cuda") == "torch"
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="VLLM_PEDRO_OPS_BACKEND"):
        ops.backend_name("cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_backend_triton_on_cpu_needs_interpret(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_name("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.backend_name("cpu")
    with pytest.raises(ops.BackendUnavailableError):
        ops.scale_(torch.ones(2, 4), torch.ones(1, 4), torch.zeros(2, dtype=torch.int32), 0)


def test_backend_forced_unavailable(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="CUDA tensors"):
        ops.backend_name("cpu")
    monkeypatch.setattr(ops._cuda, "load", lambda: (False, "no nvcc here"))
    with pytest.raises(ops.BackendUnavailableError, match="no nvcc here"):
        ops.backend_name("cuda")
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    monkeypatch.setattr(ops, "_triton", lambda: (None, "triton is not importable (x)"))
    with pytest.raises(ops.BackendUnavailableError, match="not importable"):
        ops.backend_name("cuda")


def test_backend_auto_cuda_fallbacks(monkeypatch, caplog):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    monkeypatch.setattr(ops, "_triton", lambda: (object(), ""))
    assert ops.backend_name("cuda") == "triton"
    monkeypatch.setattr(ops, "_triton", lambda: (None, "no triton"))
    monkeypatch.setattr(ops._cuda, "load", lambda: (True, "ok"))
    assert ops.backend_name("cuda") == "cuda"
    monkeypatch.setattr(ops._cuda, "load", lambda: (False, "no op"))
    monkeypatch.setattr(ops, "_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="vllm_pedro.ops"):
        assert ops.backend_name("cuda") == "torch"
        assert ops.backend_name("cuda") == "torch"
    notices = [r for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(notices) == 1


def test_cuda_loader_reason():
    ok, why = ops_cuda.load()
    assert isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok


# ---- GPU: compiled Triton and the CUDA op, and CUDA-graph capture ----

def _gpu_backend(name, monkeypatch):
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    if name == "cuda":
        ok, why = ops_cuda.load()
        if not ok:
            pytest.skip(f"CUDA op unavailable: {why}")
    monkeypatch.setenv(ops.ENV_BACKEND, name)
    assert ops.backend_name("cuda") == name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_backend_vs_reference(name, monkeypatch):
    _gpu_backend(name, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    dev = "cuda"
    for dtype in DTYPES:
        for T, (q, kv), ff in [(1, (576, 192), 1536), (37, (4096, 1024), 11008), (300, (13, 5), 1000)]:
            vectors = make_vectors(q + kv + ff + 3, dtype, gen, dev)
            for sdt in (torch.int32, torch.int64):
                slots = make_slots(T, gen, sdt).to(dev)
                qkv = torch.randn(T, q + 2 * kv, generator=gen).to(dtype).to(dev)
                want = qkv.clone()
                reference.scale_qkv_(want, vectors, slots, q, kv, 0, -1, q)
                ops.scale_qkv_(qkv, vectors, slots, q, kv, 0, -1, q)
                torch.testing.assert_close(qkv, want, atol=0, rtol=0)
                x = torch.randn(T, ff, generator=gen).to(dtype).to(dev)
                want = x.clone()
                reference.scale_(want, vectors, slots, q + kv)
                ops.scale_(x, vectors, slots, q + kv)
                torch.testing.assert_close(x, want, atol=0, rtol=0)
                gu = torch.randn(T, 2 * ff, generator=gen).to(dtype).to(dev)
                out = torch.full((T, ff), float("nan"), dtype=dtype, device=dev)
                ops.silu_and_mul_scaled(gu, vectors, slots, q + kv, out=out)
                # the kernels: fp32 math, one rounding (not the torch reference's order)
                want = oracle_silu(gu.cpu(), vectors.cpu(), slots.cpu(), q + kv)
                torch.testing.assert_close(out.cpu(), want)
        torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_cuda_graph(name, monkeypatch):
    _gpu_backend(name, monkeypatch)
    dev, dtype, T, q, kv, ff = "cuda", torch.float16, 16, 576, 192, 1536
    gen = torch.Generator().manual_seed(1)
    vectors = make_vectors(q + kv + ff, dtype, gen, dev)
    slots = torch.full((T + 8,), ONES, dtype=torch.int32, device=dev)  # static, longer than T
    src = torch.randn(T, q + 2 * kv, generator=gen).to(dtype).to(dev)
    qkv = torch.empty_like(src)
    gu = torch.randn(T, 2 * ff, generator=gen).to(dtype).to(dev)
    out = torch.empty(T, ff, dtype=dtype, device=dev)

    def step():
        qkv.copy_(src)
        ops.scale_qkv_(qkv, vectors, slots, q, kv, 0, -1, q)
        ops.silu_and_mul_scaled(gu, vectors, slots, q + kv, out=out)

    side = torch.cuda.Stream()  # warm up (Triton JIT) outside capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        slots.copy_(make_slots(T, gen, torch.int32, extra=8).to(dev))
        graph.replay()
        torch.cuda.synchronize()
        want = src.clone()
        reference.scale_qkv_(want, vectors, slots, q, kv, 0, -1, q)
        torch.testing.assert_close(qkv, want, atol=0, rtol=0)
        want_out = oracle_silu(gu.cpu(), vectors.cpu(), slots.cpu(), q + kv)
        torch.testing.assert_close(out.cpu(), want_out)


# ---- the prefill pooler (ops.pool_prompts): every implementation vs a float64 oracle ----

from vllm_pedro.generator import POOLER_CODES  # noqa: E402
from vllm_pedro.ops import cpu as ops_cpu  # noqa: E402


def oracle_pool(x, starts, lengths, rows, codes, pool_w):
    """Each prompt on its own, in float64: softmax(h w) weights / the mean / the last token."""
    out = []
    for b, n, r in zip(starts.tolist(), lengths.tolist(), rows.tolist()):
        h = x[b:b + n].double()
        code = int(codes[r])
        if code == POOLER_CODES["attention"]:
            out.append((torch.softmax(h @ pool_w[r].double(), 0)[:, None] * h).sum(0))
        elif code == POOLER_CODES["mean"]:
            out.append(h.mean(0))
        else:
            out.append(h[-1])
    return torch.stack(out)


def flat_batch(gen, lengths, d, dtype, device="cpu"):
    """PEDRO prompts as spans of a flat batch, with base tokens (gaps) around and between
    them and the spans in a shuffled order; x is a view with a padded row stride."""
    S = len(lengths)
    gaps = torch.randint(0, 4, (S + 1,), generator=gen).tolist()
    pos, spans = gaps[0], []
    for n, gap in zip(lengths, gaps[1:]):
        spans.append(pos)
        pos += n + gap
    buf = torch.randn(pos + 2, d + 5, generator=gen) * torch.rand(pos + 2, 1, generator=gen) * 3
    x = buf.to(dtype)[:, :d].to(device)
    perm = torch.randperm(S, generator=gen)
    starts = torch.tensor(spans)[perm].to(device)
    lens = torch.tensor(lengths)[perm].to(device)
    return x, starts, lens


def pool_case(seed, d, dtype, device="cpu", S=11, R=5, attention=True):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (S,), generator=gen).tolist()
    lengths[0], lengths[1] = 1, 70  # a one-token prompt; one longer than a few token blocks
    x, starts, lens = flat_batch(gen, lengths, d, dtype, device)
    # rows: every pooler, rows shared by several prompts; without attention only last / mean
    codes = torch.tensor([0, 1, 2, 0, 2] if attention else [1, 2, 1, 2, 2])[:R]
    rows = torch.randint(0, R, (S,), generator=gen)
    rows[:R] = torch.arange(R)
    pool_w = torch.randn(R, d, generator=gen) / d ** 0.5
    pool_w[3] *= 20  # peaked softmax: the max subtraction matters
    pool_w = pool_w.to(dtype)
    return (x, starts, lens, rows.to(device), codes.to(device),
            pool_w.to(device) if attention else None, sum(lengths))


def _pool_impls():
    out = ["torch", "cpu"]
    if HAS_TRITON and INTERPRET:
        out.append("triton")
    return out


def _pool_fn(impl, block_d=None):
    if impl == "cpu":
        ok, why = ops_cpu.load()
        if not ok:
            pytest.skip(f"the C++ CPU op cannot be built here: {why}")
        return ops_cpu.pool_prompts
    if impl == "triton":
        from vllm_pedro.ops import triton_kernels
        if block_d:
            return lambda *a: triton_kernels.pool_prompts(*a, block_d=block_d)
        return triton_kernels.pool_prompts
    return reference.pool_prompts


POOL_TOL = dict(atol=1e-5, rtol=1.3e-6)  # torch's float32 defaults: float32 math on exactly representable inputs


POOL_SHAPES = [(impl, d, None) for impl in _pool_impls() for d in (40, 576)] + \
    [("triton", 40, 16)] * ("triton" in _pool_impls())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,d,block_d", POOL_SHAPES, ids=lambda v: str(v))
def test_pool_prompts_vs_oracle(impl, dtype, d, block_d):
    """Mixed poolers, rows shared by prompts, a one-token prompt, spans out of order among
    base tokens, every dtype; float32 out. block_d=16: Triton's path where d spans several
    programs (each computes the scores over all of d)."""
    for attention in (True, False):
        x, starts, lens, rows, codes, pool_w, n = pool_case(d + dtype.itemsize, d, dtype, attention=attention)
        out = torch.full((starts.shape[0], d), float("nan"))
        got = _pool_fn(impl, block_d)(x, starts, lens, rows, codes, pool_w, n, out)
        assert got.data_ptr() == out.data_ptr() and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), oracle_pool(x, starts, lens, rows, codes, pool_w), **POOL_TOL)


def test_pool_codes_agree_with_the_generator():
    assert (reference.ATTENTION, reference.LAST, reference.MEAN) == (
        POOLER_CODES["attention"], POOLER_CODES["last"], POOLER_CODES["mean"])
    if HAS_TRITON:
        from vllm_pedro.ops import triton_kernels
        codes = (triton_kernels._ATTENTION.value, triton_kernels._LAST.value)  # tl.constexpr globals
        assert codes == (POOLER_CODES["attention"], POOLER_CODES["last"])
    # the C++ op's codes: test_pool_prompts_vs_oracle[cpu-*] (every pooler against the oracle)


def test_pool_prompts_checked_entry_and_backends(monkeypatch, caplog):
    x, starts, lens, rows, codes, pool_w, n = pool_case(1, 24, torch.float32)
    want = oracle_pool(x, starts, lens, rows, codes, pool_w)
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    b = ops.backend("cpu")
    assert b.pool == ("cpu" if ops_cpu.load()[0] else "torch")
    torch.testing.assert_close(ops.pool_prompts(x, starts, lens, rows, codes, pool_w, n).double(), want, **POOL_TOL)
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")  # asked for: the torch formulation
    assert ops.backend("cpu").pool == "torch"
    torch.testing.assert_close(ops.pool_prompts(x, starts, lens, rows, codes, pool_w, n).double(), want, **POOL_TOL)
    # the C++ op unavailable: the torch formulation, said once
    monkeypatch.delenv(ops.ENV_BACKEND)
    monkeypatch.setattr(ops._cpu, "load", lambda: (False, "no compiler here"))
    monkeypatch.setattr(ops, "_pool_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="vllm_pedro.ops"):
        assert ops.backend("cpu").pool == "torch"
        assert ops.backend("cpu").pool == "torch"
    assert len([r for r in caplog.records if "no compiler here" in r.getMessage()]) == 1
    empty = ops.pool_prompts(x, starts[:0], lens[:0], rows[:0], codes, pool_w, 0)
    assert empty.shape == (0, 24)
    bad = [
        lambda: ops.pool_prompts(x, starts.int(), lens, rows, codes, pool_w, n),  # int32 spans
        lambda: ops.pool_prompts(x, starts, lens[:-1], rows, codes, pool_w, n),  # one length short
        lambda: ops.pool_prompts(x.double(), starts, lens, rows, codes, pool_w.double(), n),
        lambda: ops.pool_prompts(x, starts, lens, rows, codes, pool_w.half(), n),  # dtype mismatch
        lambda: ops.pool_prompts(x, starts, lens, rows, codes, pool_w[:, :5], n),
        lambda: ops.pool_prompts(x.t(), starts, lens, rows, codes, pool_w, n),  # last dim not contiguous
        lambda: ops.pool_prompts(x, starts, lens, rows, codes, pool_w, n, out=torch.empty(3, 24)),
    ]
    for i, f in enumerate(bad):
        with pytest.raises(ValueError):
            f()
            pytest.fail(f"case {i} did not raise")


def test_cpu_pool_op_refuses_out_of_range_spans():
    ok, why = ops_cpu.load()
    if not ok:
        pytest.skip(f"the C++ CPU op cannot be built here: {why}")
    x, starts, lens, rows, codes, pool_w, n = pool_case(2, 16, torch.float32)
    out = torch.empty(starts.shape[0], 16)
    for s, ln, r, w in ((starts + x.shape[0], lens, rows, pool_w), (starts, lens * 0, rows, pool_w),
                        (starts, lens, rows + 5, pool_w), (starts, lens, rows, None)):
        with pytest.raises(RuntimeError):
            ops_cpu.pool_prompts(x, s, ln, r, codes, w, n, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cpu_scale_rows_op_is_the_reference_gather_multiply(dtype, slot_dtype):
    """The C++ in-place gather-multiply (compiled mode's qkv scaling and the eager path on the
    CPU): every element equal to the torch reference, bit for bit, on whole rows and on a
    strided half ([gate | up]); tokens on the skipped row (the ones row) are not touched."""
    ok, why = ops_cpu.load()
    if not ok:
        pytest.skip(f"the C++ CPU op cannot be built here: {why}")
    gen = torch.Generator().manual_seed(7)
    rows, width, skip = 9, 2496, 8
    vectors = (1 + 0.3 * torch.randn(rows, width, generator=gen)).to(dtype)
    vectors[skip] = 1
    for n, w, col, half in ((1, 960, 0, False), (257, 960, 0, False), (300, 1536, 960, True), (64, 192, 768, False)):
        slot = torch.randint(0, rows, (n + 5,), generator=gen).to(slot_dtype)
        x = torch.randn(n, 2 * w if half else w, generator=gen).to(dtype)
        target = (lambda t: t[:, w:]) if half else (lambda t: t)
        want, got = x.clone(), x.clone()
        reference.scale_(target(want), vectors, slot, col)
        ops_cpu.scale_rows_(target(got), vectors, slot, col, skip)
        assert torch.equal(got, want), (dtype, n, w, col, half)
    # `skip` means untouched, whatever that row holds (the runtime passes the ones row).
    odd = vectors.clone()
    odd[skip] = 2
    x = torch.randn(4, 16, generator=gen).to(dtype)
    got = x.clone()
    ops_cpu.scale_rows_(got, odd, torch.tensor([skip, 0, skip, 1], dtype=slot_dtype), 0, skip)
    assert torch.equal(got[[0, 2]], x[[0, 2]]) and not torch.equal(got[1], x[1])
    for bad in ([rows, 0, 0, 0], [-1, 0, 0, 0]):
        with pytest.raises(RuntimeError, match="slot"):
            ops_cpu.scale_rows_(x.clone(), vectors, torch.tensor(bad, dtype=slot_dtype), 0, skip)
    with pytest.raises(RuntimeError, match="columns"):
        ops_cpu.scale_rows_(x.clone(), vectors, torch.zeros(4, dtype=slot_dtype), width - 8, skip)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the same cases "
                    "through Triton's interpreter: test_pool_prompts_vs_oracle)")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_pool_prompts_vs_oracle(impl):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    for dtype in DTYPES:
        for d, block_d in ((576, None), (4096, None), (2048, 256), (40, 16)):
            if block_d and impl != "triton":
                continue
            for attention in (True, False):
                x, starts, lens, rows, codes, pool_w, n = pool_case(d, d, dtype, "cuda", S=37, attention=attention)
                out = torch.full((starts.shape[0], d), float("nan"), device="cuda")
                _pool_fn(impl, block_d)(x, starts, lens, rows, codes, pool_w, n, out)
                want = oracle_pool(x.cpu(), starts.cpu(), lens.cpu(), rows.cpu(), codes.cpu(),
                                   None if pool_w is None else pool_w.cpu())
                torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)
