"""PEDRO ops: the gather-scale ops (one launch per layer and target over the whole batch)
and the prefill pooler (`pool_prompts`: every PEDRO prompt of a step pooled in place).

Each token t carries a slot index slot_idx[t], a row of the per-layer vector table
vectors[S, W]; base-model tokens point at a row of ones and keep their exact bits. (The
GPU kernels also skip a negative index without reading a vector; the torch reference
does not accept one, it would need a mask.) Backends: torch (reference, CPU), triton
(main GPU path), cuda (csrc/ custom op), one signature for all three.

`backend(device)` resolves which one runs, once: env VLLM_PEDRO_OPS_BACKEND in {torch,
triton, cuda}, else auto: CPU tensors -> torch, CUDA tensors -> triton if importable,
else the CUDA op, else torch (logged once). The PEDRO runtime resolves it when it starts
and calls the chosen functions directly; the module-level functions below check their
arguments and resolve per call (tests, benchmarks).

The prefill pooler has its own implementations: on the CPU a C++ op built on first use
(cpu.py; the torch formulation if it cannot be built, or when VLLM_PEDRO_OPS_BACKEND=torch
is asked for), Triton on the GPU (the torch formulation without Triton: csrc/ has no
pooling kernel).

Checks here look at shapes, dtypes and devices only, never at values: no host sync,
so the ops run under CUDA-graph capture with static buffers.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cpu as _cpu
from . import cuda as _cuda
from . import reference as _reference

__all__ = ["scale_qkv_", "scale_", "silu_and_mul_scaled", "pool_prompts", "backend", "backend_name", "Backend",
           "BackendUnavailableError", "ENV_BACKEND"]

ENV_BACKEND = "VLLM_PEDRO_OPS_BACKEND"
BACKENDS = ("torch", "triton", "cuda")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SLOT_DTYPES = (torch.int32, torch.int64)

logger = logging.getLogger(__name__)
_fallback_logged = False
_pool_fallback_logged = False


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (VLLM_PEDRO_OPS_BACKEND) that cannot run here."""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton():
    """(module, "") or (None, reason). Imported lazily: the package works without triton."""
    try:
        from . import triton_kernels
        return triton_kernels, ""
    except Exception as e:  # ImportError, or a triton that fails to initialise
        return None, f"triton is not importable ({type(e).__name__}: {e})"


def _requested() -> str:
    req = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if req not in ("auto",) + BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={req!r}: expected one of {', '.join(BACKENDS)}")
    return req


def _resolve(device_type: str) -> str:
    global _fallback_logged
    req = _requested()
    if req == "torch":
        return "torch"
    if req == "triton":
        mod, why = _triton()
        if mod is None:
            raise BackendUnavailableError(f"{ENV_BACKEND}=triton but {why}")
        if device_type != "cuda" and not _interpret():
            raise BackendUnavailableError(
                f"{ENV_BACKEND}=triton on {device_type} tensors needs TRITON_INTERPRET=1 "
                "(Triton has no CPU backend)")
        return "triton"
    if req == "cuda":
        if device_type != "cuda":
            raise BackendUnavailableError(
                f"{ENV_BACKEND}=cuda needs CUDA tensors, got {device_type} tensors")
        ok, why = _cuda.load()
        if not ok:
            raise BackendUnavailableError(f"{ENV_BACKEND}=cuda but the CUDA op is unavailable: {why}")
        return "cuda"
    if device_type != "cuda":
        return "torch"
    if _triton()[0] is not None:
        return "triton"
    ok, why = _cuda.load()
    if ok:
        return "cuda"
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning("vllm_pedro.ops: neither triton (%s) nor the CUDA op (%s) is available; "
                       "using the torch reference ops (slower)", _triton()[1], why)
    return "torch"


@dataclass(frozen=True)
class Backend:
    """The ops of one backend, without argument checks: for callers whose buffers are
    checked once (the PEDRO runtime). `pool` names the prefill pooler's implementation."""

    name: str
    scale_qkv_: Callable
    scale_: Callable
    silu_and_mul_scaled: Callable
    pool_prompts: Callable
    pool: str


def _module(name: str):
    return _triton()[0] if name == "triton" else (_cuda if name == "cuda" else _reference)


def _pool(name: str, device_type: str) -> tuple[str, Callable]:
    """The prefill pooler for backend `name` on `device_type`: (implementation, function)."""
    global _pool_fallback_logged
    if name == "triton":
        return "triton", _triton()[0].pool_prompts
    if name == "cuda" and _triton()[0] is not None:
        return "triton", _triton()[0].pool_prompts
    if device_type == "cpu" and _requested() != "torch":
        ok, why = _cpu.load()
        if ok:
            return "cpu", _cpu.pool_prompts
        if not _pool_fallback_logged:
            _pool_fallback_logged = True
            logger.warning("vllm_pedro.ops: the C++ prefill pooler is unavailable (%s); using the torch "
                           "formulation (slower)", why)
    return "torch", _reference.pool_prompts


def backend(device) -> Backend:
    """The backend for tensors on `device`, resolved now (reads VLLM_PEDRO_OPS_BACKEND;
    on the CPU, builds or loads the C++ prefill pooler once per process)."""
    device_type = torch.device(device).type
    name = _resolve(device_type)
    mod = _module(name)
    pool, pool_fn = _pool(name, device_type)
    return Backend(name, mod.scale_qkv_, mod.scale_, mod.silu_and_mul_scaled, pool_fn, pool)


def backend_name(device) -> str:
    """The backend the ops would run on for tensors on `device`."""
    return _resolve(torch.device(device).type)


# ---- validation: shapes, dtypes, devices only ----

def _check_rows(x, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} dtype {x.dtype} unsupported (float32, float16, bfloat16)")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim, got strides {x.stride()}")


def _check(x, vectors, slot_idx, name: str) -> None:
    _check_rows(x, name)
    _check_rows(vectors, "vectors")
    if vectors.dtype != x.dtype:
        raise ValueError(f"vectors dtype {vectors.dtype} != {name} dtype {x.dtype}")
    if not isinstance(slot_idx, torch.Tensor) or slot_idx.dim() != 1 \
            or slot_idx.dtype not in _SLOT_DTYPES:
        raise ValueError("slot_idx must be a 1-D int32 or int64 tensor")
    if slot_idx.shape[0] < x.shape[0]:
        raise ValueError(f"slot_idx has {slot_idx.shape[0]} entries for {x.shape[0]} tokens")
    if vectors.device != x.device or slot_idx.device != x.device:
        raise ValueError(f"{name} ({x.device}), vectors ({vectors.device}) and slot_idx "
                         f"({slot_idx.device}) must be on one device")


def _check_col(col: int, width: int, vectors, name: str) -> None:
    if col >= 0 and col + width > vectors.shape[1]:
        raise ValueError(f"{name} columns [{col}, {col + width}) exceed vectors width "
                         f"{vectors.shape[1]}")


# ---- the ops ----

def scale_qkv_(qkv, vectors, slot_idx, q_size: int, kv_size: int,
               q_col: int, k_col: int, v_col: int) -> None:
    """In place, one launch: qkv's q / k / v ranges *= vectors[slot_idx[t], col:col+width]
    for each range whose col >= 0."""
    _check(qkv, vectors, slot_idx, "qkv")
    if q_size < 0 or kv_size < 0 or qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(f"qkv width {qkv.shape[1]} != q_size {q_size} + 2 * kv_size {kv_size}")
    _check_col(q_col, q_size, vectors, "q")
    _check_col(k_col, kv_size, vectors, "k")
    _check_col(v_col, kv_size, vectors, "v")
    if qkv.shape[0] == 0:
        return
    _module(_resolve(qkv.device.type)).scale_qkv_(qkv, vectors, slot_idx, q_size, kv_size, q_col, k_col, v_col)


def scale_(x, vectors, slot_idx, col: int) -> None:
    """In place: x[t, :] *= vectors[slot_idx[t], col:col+D]. col < 0 (target not adapted,
    as in scale_qkv_): no-op."""
    _check(x, vectors, slot_idx, "x")
    _check_col(col, x.shape[1], vectors, "x")
    if x.shape[0] == 0:
        return
    _module(_resolve(x.device.type)).scale_(x, vectors, slot_idx, col)


def silu_and_mul_scaled(gate_up, vectors, slot_idx, col: int, out=None) -> torch.Tensor:
    """silu(gate) * up * vectors[slot_idx[t], col:col+D], gate_up = [gate | up]; factor 1
    for every token when col < 0 (plain SiluAndMul)."""
    _check(gate_up, vectors, slot_idx, "gate_up")
    T, two_d = gate_up.shape
    if two_d % 2:
        raise ValueError(f"gate_up width {two_d} is odd; expected [gate | up]")
    D = two_d // 2
    _check_col(col, D, vectors, "up")
    if out is None:
        out = torch.empty(T, D, dtype=gate_up.dtype, device=gate_up.device)
    else:
        _check_rows(out, "out")
        if tuple(out.shape) != (T, D) or out.dtype != gate_up.dtype or out.device != gate_up.device:
            raise ValueError(f"out {tuple(out.shape)} {out.dtype} {out.device} does not fit "
                             f"gate_up {tuple(gate_up.shape)} {gate_up.dtype} {gate_up.device}")
    if T == 0:
        return out
    return _module(_resolve(gate_up.device.type)).silu_and_mul_scaled(gate_up, vectors, slot_idx, col, out)


def pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, num_tokens: int, out=None) -> torch.Tensor:
    """Prefill pooler: out[s] = prompt s pooled (float32), prompt s being the tokens
    x[starts[s] : starts[s] + lengths[s]] of the flat batch, read in place, through the
    pooler of its generator row rows[s] (pooler_code[rows[s]]: generator.POOLER_CODES;
    attention scores against pool_w[rows[s]]). pool_w may be None when no prompt's row
    uses the attention pooler. num_tokens = sum(lengths), known on the host (the torch
    formulation sizes its per-token arrays with it; no device sync anywhere)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a 2-D float32/float16/bfloat16 tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    S = starts.shape[0] if isinstance(starts, torch.Tensor) else -1
    for name, t in (("starts", starts), ("lengths", lengths), ("rows", rows), ("pooler_code", pooler_code)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64 or t.device != x.device:
            raise ValueError(f"{name} must be a 1-D int64 tensor on {x.device}")
    if lengths.shape[0] != S or rows.shape[0] != S:
        raise ValueError(f"starts, lengths, rows: one entry per prompt, got {S}, {lengths.shape[0]}, {rows.shape[0]}")
    if pool_w is not None and (pool_w.dim() != 2 or pool_w.shape[1] != x.shape[1] or pool_w.dtype != x.dtype
                               or pool_w.device != x.device or pool_w.stride(1) != 1):
        raise ValueError(f"pool_w must be [R, {x.shape[1]}] {x.dtype} on {x.device} with a contiguous last dim")
    if out is None:
        out = torch.empty(S, x.shape[1], dtype=torch.float32, device=x.device)
    elif tuple(out.shape) != (S, x.shape[1]) or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device != x.device:
        raise ValueError(f"out must be a contiguous float32 [{S}, {x.shape[1]}] on {x.device}")
    if S == 0:
        return out
    return backend(x.device).pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, num_tokens, out)
