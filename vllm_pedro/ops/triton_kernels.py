"""Triton kernels for the PEDRO gather-scale ops (the main GPU path).

Grid: (token, column block). Each program loads its token's slot once; base tokens
(slot < 0) are masked out entirely, so they cost no vector or activation traffic and
keep their exact bits. Math in fp32, one rounding to the activation dtype on store.
Only imported when the triton backend runs (the package works without triton).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _scale3_kernel(x_ptr, x_stride, vec_ptr, vec_stride, slot_ptr, slot_stride,
                   q_size, kv_size, q_col, k_col, v_col,
                   HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_V: tl.constexpr,
                   BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # Which of the three ranges (q | k | v) each column is in, and its vector column.
    in_q = c < q_size
    in_k = (c >= q_size) & (c < q_size + kv_size)
    in_v = (c >= q_size + kv_size) & (c < q_size + 2 * kv_size)
    vcol = tl.where(in_q, q_col + c,
                    tl.where(in_k, k_col + c - q_size, v_col + c - q_size - kv_size))
    active = c < 0  # all false; ranges switched on at compile time
    if HAS_Q:
        active = active | in_q
    if HAS_K:
        active = active | in_k
    if HAS_V:
        active = active | in_v
    # (s + 0*c): a per-column copy of the slot, because the interpreter turns
    # bool-block & bool-scalar into an int32 mask that tl.load rejects.
    mask = active & ((s + 0 * c) >= 0)
    x_row = x_ptr + t * x_stride
    v_row = vec_ptr + tl.maximum(s, 0) * vec_stride  # clamp: no wild address for s = -1
    x = tl.load(x_row + c, mask=mask, other=0.0)
    v = tl.load(v_row + vcol, mask=mask, other=0.0)
    y = x.to(tl.float32) * v.to(tl.float32)
    tl.store(x_row + c, y.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, gu_stride, out_ptr, out_stride, vec_ptr, vec_stride,
                     slot_ptr, slot_stride, D, col,
                     HAS_VEC: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < D
    gu_row = gu_ptr + t * gu_stride
    g = tl.load(gu_row + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_row + D + c, mask=m, other=0.0).to(tl.float32)
    # Not tl.sigmoid: a @jit library function that breaks when the interpreter and the
    # compiler are mixed in one process (triton imported in the other mode).
    y = g / (1.0 + tl.exp(-g)) * u
    if HAS_VEC:  # col >= 0; base tokens (slot < 0): factor 1 and no vector read
        s = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
        v = tl.load(vec_ptr + tl.maximum(s, 0) * vec_stride + col + c,
                    mask=m & ((s + 0 * c) >= 0), other=1.0).to(tl.float32)
        y = y * v
    tl.store(out_ptr + t * out_stride + c, y.to(out_ptr.dtype.element_ty), mask=m)


_cache: dict = {}


def _get(kernel):
    """The kernel in the mode TRITON_INTERPRET asks for now.

    triton.jit picks interpreter vs compiler when it decorates (at import), so a test that
    sets TRITON_INTERPRET after this module was imported would otherwise get compiled
    kernels on CPU tensors. Re-decorate the same Python function when the mode differs.
    """
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    key = (kernel.fn, interp)
    k = _cache.get(key)
    if k is None:
        is_interp = type(kernel).__name__ == "InterpretedFunction"
        k = _cache[key] = kernel if is_interp == interp else triton.jit(kernel.fn)
    return k


def _block(T: int, n: int) -> tuple[int, int]:
    # Few tokens (decode): smaller blocks so more programs fill the SMs.
    cap = 1024 if T >= 32 else 256
    block = min(triton.next_power_of_2(max(n, 1)), cap)
    return block, max(1, min(8, block // 256))


def scale_qkv_(qkv, vectors, slot_idx, q_size, kv_size, q_col, k_col, v_col) -> None:
    T, n = qkv.shape
    has = (q_col >= 0 and q_size > 0, k_col >= 0 and kv_size > 0, v_col >= 0 and kv_size > 0)
    if T == 0 or n == 0 or not any(has) or vectors.shape[0] == 0:
        return
    block, warps = _block(T, n)
    _get(_scale3_kernel)[(T, triton.cdiv(n, block))](
        qkv, qkv.stride(0), vectors, vectors.stride(0), slot_idx, slot_idx.stride(0),
        q_size, kv_size, q_col, k_col, v_col,
        HAS_Q=has[0], HAS_K=has[1], HAS_V=has[2], BLOCK=block, num_warps=warps)


def scale_(x, vectors, slot_idx, col) -> None:
    # One range of the qkv kernel: q = all of x, no k/v.
    scale_qkv_(x, vectors, slot_idx, x.shape[1], 0, col, -1, -1)


def silu_and_mul_scaled(gate_up, vectors, slot_idx, col, out) -> torch.Tensor:
    T, D = out.shape
    if T == 0 or D == 0:
        return out
    block, warps = _block(T, D)
    # No slots at all (every token a base token) or col < 0: plain SiluAndMul, no vector.
    has_vec = col >= 0 and vectors.shape[0] > 0
    vec = vectors if has_vec else out  # a real pointer, never read
    _get(_silu_mul_kernel)[(T, triton.cdiv(D, block))](
        gate_up, gate_up.stride(0), out, out.stride(0), vec, vec.stride(0),
        slot_idx, slot_idx.stride(0), D, max(col, 0), HAS_VEC=has_vec, BLOCK=block,
        num_warps=warps)
    return out


# -- the prefill pooler ------------------------------------------------------------------------
# Pooler codes: vllm_pedro.generator.POOLER_CODES (config.POOLERS order).
_ATTENTION, _LAST = tl.constexpr(0), tl.constexpr(1)  # jit functions may read constexpr globals only


@triton.jit
def _pool_kernel(x_ptr, x_stride, start_ptr, len_ptr, row_ptr, code_ptr, w_ptr, w_stride, out_ptr, out_stride, d,
                 HAS_W: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (prompt s, column block): one pass over the prompt's tokens, read in place.
    Every pooler is a softmax over the prompt's tokens: attention with scores x . pool_w,
    mean with scores 0 (uniform weights), last with the span cut to its final token. The
    softmax is online (running max m and sum l, the accumulator rescaled as m grows), so
    the weighted sum needs no second pass. (tl.sum / tl.max are triton.language's own jit
    functions: interpreted, this runs only if triton was imported with TRITON_INTERPRET=1
    already set, as tests/conftest.py arranges; _get's re-decoration cannot fix those.
    The other way round, this dynamic-bound loop does not compile in a process whose
    triton was imported interpreted: tests/test_cuda_source.py compiles it in a fresh one.)"""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(start_ptr + s).to(tl.int64)
    n = tl.load(len_ptr + s).to(tl.int64)
    row = tl.load(row_ptr + s).to(tl.int64)
    code = tl.load(code_ptr + row)
    first = tl.where(code == _LAST, n - 1, 0)
    w_row = w_ptr + row * w_stride
    # (code + 0 * cols): a per-column copy, because the interpreter turns bool-block &
    # bool-scalar into an int32 mask that tl.load rejects (as in _scale3_kernel).
    if HAS_W and ONE_BLOCK:  # all of d in this program: the scores come from the same tile
        w = tl.load(w_row + cols, mask=cmask & ((code + 0 * cols) == _ATTENTION), other=0.0).to(tl.float32)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(first, n, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < n
        x_rows = x_ptr + (start + t)[:, None] * x_stride
        xt = tl.load(x_rows + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        score = tl.zeros((BLOCK_T,), tl.float32)
        if HAS_W:
            if ONE_BLOCK:
                score = tl.sum(xt * w[None, :], axis=1)
            else:  # d spans several programs: each computes the full scores over all of d
                for k0 in range(0, d, BLOCK_D):
                    k = k0 + tl.arange(0, BLOCK_D)
                    kmask = k < d
                    wk = tl.load(w_row + k, mask=kmask & ((code + 0 * k) == _ATTENTION), other=0.0).to(tl.float32)
                    xk = tl.load(x_rows + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                    score += tl.sum(xk * wk[None, :], axis=1)
        score = tl.where(tmask, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * xt, axis=0)
        m = m_new
    tl.store(out_ptr + s * out_stride + cols, acc / l, mask=cmask)


def pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, num_tokens, out, block_d: int = 1024):
    S, d = out.shape
    if S == 0 or d == 0:
        return out
    block = min(triton.next_power_of_2(d), block_d)
    block_t = max(1, min(16, 8192 // block))  # a tile of at most 8K floats
    has_w = pool_w is not None
    w = pool_w if has_w else out  # a real pointer, never read
    _get(_pool_kernel)[(S, triton.cdiv(d, block))](
        x, x.stride(0), starts, lengths, rows, pooler_code, w, w.stride(0), out, out.stride(0), d,
        HAS_W=has_w, ONE_BLOCK=block >= d, BLOCK_T=block_t, BLOCK_D=block, num_warps=4 if block <= 256 else 8)
    return out
