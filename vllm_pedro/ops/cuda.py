"""Loads the CUDA custom ops torch.ops.vllm_pedro.* (csrc/).

Order: the extension built by setup.py (vllm_pedro._C); else a JIT build of csrc/ with
torch.utils.cpp_extension.load when CUDA and nvcc are there; else unavailable, with the
reason. Tried once per process; the result is cached.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

NAMESPACE = "vllm_pedro"  # the TORCH_LIBRARY namespace in csrc/torch_bindings.cpp
_OPS = ("scale_qkv_", "scale_", "silu_and_mul_scaled")
CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("pedro_kernels.cu", "torch_bindings.cpp")

_state: tuple[bool, str] | None = None


def _registered() -> bool:
    ns = getattr(torch.ops, NAMESPACE)
    return all(hasattr(ns, op) for op in _OPS)


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _register_fakes() -> None:
    # The ops only mutate their first argument and return nothing; torch.compile still
    # wants a fake (meta) kernel to trace them.
    for op in _OPS:
        try:
            torch.library.register_fake(f"{NAMESPACE}::{op}")(lambda *args, **kwargs: None)
        except Exception:  # already registered (a second loader); never fatal
            pass


def _load() -> tuple[bool, str]:
    if _registered():
        return True, "already registered"
    try:
        import vllm_pedro._C  # noqa: F401  (registers the ops on import)
        if _registered():
            return True, "prebuilt vllm_pedro._C"
        why = "vllm_pedro._C does not register the ops"
    except ImportError as e:
        why = f"no prebuilt vllm_pedro._C ({e})"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False, f"{why}; torch has no usable CUDA, so no JIT build"
    if _nvcc() is None:
        return False, f"{why}; nvcc not found (set CUDA_HOME), so no JIT build"
    if not all((CSRC / s).exists() for s in SOURCES):
        return False, f"{why}; CUDA sources not found in {CSRC}"
    try:
        from torch.utils.cpp_extension import load
        load(name="vllm_pedro_C", sources=[str(CSRC / s) for s in SOURCES],
             extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # a compiler error: report it, the caller falls back or raises
        return False, f"{why}; JIT build of {CSRC} failed: {e}"
    if not _registered():
        return False, f"{why}; JIT-built library did not register the ops"
    return True, "JIT-built from csrc/"


def load() -> tuple[bool, str]:
    """(available, reason). Builds or loads at most once per process."""
    global _state
    if _state is None:
        _state = _load()
        if _state[0]:
            _register_fakes()
    return _state


# Argument order follows the schemas in torch_bindings.cpp (tests/test_cuda_source.py
# checks it against them on the CPU).

def scale_qkv_(qkv, vectors, slot_idx, q_size, kv_size, q_col, k_col, v_col) -> None:
    getattr(torch.ops, NAMESPACE).scale_qkv_(qkv, vectors, slot_idx, q_size, kv_size,
                                             q_col, k_col, v_col)


def scale_(x, vectors, slot_idx, col) -> None:
    getattr(torch.ops, NAMESPACE).scale_(x, vectors, slot_idx, col)


def silu_and_mul_scaled(gate_up, vectors, slot_idx, col, out):
    getattr(torch.ops, NAMESPACE).silu_and_mul_scaled(out, gate_up, vectors, slot_idx, col)
    return out
