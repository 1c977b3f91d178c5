"""Loads the C++ CPU ops torch.ops.vllm_pedro_cpu.pool_prompts and .scale_rows_ (cpu_ops.cpp,
beside this file).

Built on first use with torch.utils.cpp_extension.load into torch's extension cache
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): about 15 s once per machine and
torch version, then a load of the cached library. It needs a C++ compiler, which vLLM's
compiled mode on the CPU (inductor) needs anyway. The ISA flags follow the vector
capability torch detects here, and are part of the extension's name, so a cache shared
by different machines never hands one a library built for another's ISA. Without a
compiler, or if the build fails, unavailable with the reason: the caller runs the torch
formulation (reference.pool_prompts). Tried once per process; the result is cached.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

NAMESPACE = "vllm_pedro_cpu"  # the TORCH_LIBRARY namespace in cpu_ops.cpp
SOURCE = Path(__file__).resolve().parent / "cpu_ops.cpp"
ENV_DISABLE = "VLLM_PEDRO_CPU_OP"  # "0": never build or load the C++ op (the torch formulation runs)

# gcc flags per torch CPU capability (torch.backends.cpu.get_cpu_capability()).
_ISA = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"]}

_state: tuple[bool, str] | None = None


def _registered() -> bool:
    ns = getattr(torch.ops, NAMESPACE)
    return hasattr(ns, "pool_prompts") and hasattr(ns, "scale_rows_")


def _load() -> tuple[bool, str]:
    if _registered():
        return True, "already registered"
    if os.environ.get(ENV_DISABLE, "1").strip() == "0":
        return False, f"{ENV_DISABLE}=0"
    if not SOURCE.exists():
        return False, f"source {SOURCE} not found"
    cap = torch.backends.cpu.get_cpu_capability()
    isa = _ISA.get(cap, [])
    try:
        from torch.utils.cpp_extension import load
        load(name=f"vllm_pedro_cpu_{cap.lower() if isa else 'default'}", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-fopenmp-simd", *isa], is_python_module=False)
    except Exception as e:  # no compiler, or a compiler error: report it, the caller falls back
        return False, f"building {SOURCE.name} failed: {type(e).__name__}: {str(e).strip()[-500:]}"
    if not _registered():
        return False, "the built library did not register the op"
    return True, f"built or loaded from the cache ({cap})"


def load() -> tuple[bool, str]:
    """(available, reason). Builds or loads at most once per process."""
    global _state
    if _state is None:
        _state = _load()
    return _state


def scale_rows_(x, vectors, slot_idx, col: int, skip: int) -> None:
    """In place: x[t] *= vectors[slot_idx[t], col:col + W] for tokens whose slot is not
    `skip` (the ones row, left untouched)."""
    getattr(torch.ops, NAMESPACE).scale_rows_(x, vectors, slot_idx, col, skip)


def pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, num_tokens, out):
    getattr(torch.ops, NAMESPACE).pool_prompts(x, starts, lengths, rows, pooler_code, pool_w, out)
    return out
