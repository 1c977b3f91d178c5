"""Torch reference of the PEDRO gather-scale ops: the CPU path, the test oracle, and the
form torch.compile traces (plain tensor ops, no host synchronisation).

Every token's slot index picks a row of `vectors`; base tokens point at a row of ones, so
the scaling is one gather and one multiply with no mask, and multiplying by 1.0 keeps
their bits. Products are taken in float32 and stored in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
