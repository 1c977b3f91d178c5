"""Torch reference of the PEDRO gather-scale ops: the CPU path, the test oracle, and the
form torch.compile traces (plain tensor ops, no host synchronisation).

Every token's slot index picks a row of `vectors`; base tokens point at a row of ones, so
the scaling is one gather and one multiply with no mask, and multiplying by 1.0 keeps
their bits. Products are taken in float32 and stored in the activation dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# The pooler's torch formulation builds CSR tensors, stable since torch 1.13 yet still
# announced as beta on every new process; the notice says nothing to a PEDRO user.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _rows(vectors: torch.Tensor, slot_idx: torch.Tensor, T: int, col: int, width: int) -> torch.Tensor:
    # index_select on the column slice: ~20x faster on the CPU than advanced indexing
    # vectors[s, col:col+width] (which dominated PEDRO's decode cost in a py-spy profile).
    return vectors[:, col:col + width].index_select(0, slot_idx[:T])


def _scaled(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x * v if x.dtype == torch.float32 else (x.float() * v.float()).to(x.dtype)


def scaled(x: torch.Tensor, vectors, slot_idx, col: int) -> torch.Tensor:
    """x * vectors[slot_idx[t], col:col+D] out of place (the form torch.compile traces)."""
    return _scaled(x, _rows(vectors, slot_idx, x.shape[0], col, x.shape[1]))


def _scale_range_(x: torch.Tensor, vectors, slot_idx, col: int) -> None:
    v = _rows(vectors, slot_idx, x.shape[0], col, x.shape[1])
    if x.dtype == torch.float32:
        x.mul_(v)
    else:
        x.copy_(_scaled(x, v))


def scale_qkv_(qkv, vectors, slot_idx, q_size, kv_size, q_col, k_col, v_col) -> None:
    for start, size, col in ((0, q_size, q_col), (q_size, kv_size, k_col),
                             (q_size + kv_size, kv_size, v_col)):
        if col >= 0 and size > 0:
            _scale_range_(qkv[:, start:start + size], vectors, slot_idx, col)


def scale_(x, vectors, slot_idx, col) -> None:
    if col >= 0 and x.shape[1] > 0:
        _scale_range_(x, vectors, slot_idx, col)


def silu_and_mul_scaled(gate_up, vectors, slot_idx, col, out=None) -> torch.Tensor:
    """silu(gate) * U' with U' = up * l_u rounded to the activation dtype: with l_u = 1 this
    is vLLM's native SiluAndMul bit for bit, and it is the transformers reference's order
    (scale the up projection, then the gated product)."""
    D = gate_up.shape[1] // 2
    g, u = gate_up[:, :D], gate_up[:, D:2 * D]
    if col >= 0:
        u = _scaled(u, _rows(vectors, slot_idx, gate_up.shape[0], col, D))
    y = F.silu(g) * u
    return y if out is None else out.copy_(y)


# Pooler codes: vllm_pedro.generator.POOLER_CODES (config.POOLERS order); the ops package
# does not import the generator, tests check the two agree.
ATTENTION, LAST, MEAN = 0, 1, 2


def pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, num_tokens: int, out) -> torch.Tensor:
    """The torch formulation of the prefill pooler (the CPU fallback when the C++ op cannot
    be built, and the torch backend on a GPU): the hidden states are read in place, never
    gathered. Prompt s is the span x[starts[s] : starts[s] + lengths[s]]; its pooling is
    a row of weights over those tokens, so all prompts together are one sparse [S, T]
    matrix (CSR: a row per prompt, its tokens as columns) times x. The attention scores
    are the sampled product pool_w[rows] @ x.T at the same sparsity pattern. Per-token
    index arrays here are [num_tokens] integers, built from the spans; num_tokens (the
    host's sum of lengths) sizes them without a device sync."""
    S, T, dev = starts.shape[0], x.shape[0], x.device
    crow = torch.zeros(S + 1, dtype=torch.long, device=dev)
    torch.cumsum(lengths, 0, out=crow[1:])
    seg = torch.repeat_interleave(torch.arange(S, device=dev), lengths, output_size=num_tokens)
    per_token = lambda t: t.index_select(0, seg)  # noqa: E731  (per prompt -> per token)
    cols = per_token(starts - crow[:-1]) + torch.arange(num_tokens, device=dev)
    code = per_token(pooler_code.index_select(0, rows))
    last = (cols == per_token(starts + lengths - 1)).float()
    w = torch.where(code == MEAN, per_token(1.0 / lengths.float()), last)
    xf = x if x.dtype == torch.float32 else x.float()  # the sparse products take one dtype
    csr = lambda v: torch.sparse_csr_tensor(crow, cols, v, (S, T), check_invariants=False)  # noqa: E731
    if pool_w is not None:
        s = torch.sparse.sampled_addmm(csr(w), pool_w.index_select(0, rows).float(), xf.T, beta=0).values()
        s = torch.where(code == ATTENTION, s, 0.0)
        smax = torch.full((S,), float("-inf"), device=dev).scatter_reduce(0, seg, s, "amax")
        e = torch.exp(s - per_token(smax))
        w = torch.where(code == ATTENTION, e / per_token(torch.zeros(S, device=dev).index_add(0, seg, e)), w)
    return out.copy_(csr(w) @ xf)
