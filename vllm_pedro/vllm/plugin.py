"""The `vllm.general_plugins` entry point. vLLM calls `register()` in every process
(front end, engine core, workers) before it builds the engine (and before it builds a
command-line parser). It checks the vLLM version, registers the PEDRO custom ops and adds
the PEDRO flags to vLLM's parsers; nothing else of vLLM changes until PEDRO is enabled
(patches.py)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_pedro")



def parse_version(text: str) -> tuple[int, int, int]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = len(piece) - len(piece.lstrip("0123456789"))
        parts.append(int(piece[:digits]) if digits else 0)  # "0rc1" -> 0
    return tuple((parts + [0, 0, 0])[:3])


def parse_range(spec: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """">=0.32.0,<0.33.0" -> ((0, 32, 0), (0, 33, 0)): [lower, upper)."""
    lo, hi = (part.strip() for part in spec.split(","))
    assert lo.startswith(">=") and hi.startswith("<"), spec
    return parse_version(lo[2:]), parse_version(hi[1:])


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside the range of any entry of patches.REGISTER (the vLLM versions
    each internal the plugin touches was written and tested against)."""
    from .patches import REGISTER

    if version is None:
        import vllm
        version = vllm.__version__
    v = parse_version(version)
    outside = sorted({p.vllm for p in REGISTER if not (parse_range(p.vllm)[0] <= v < parse_range(p.vllm)[1])})
    if outside:
        raise RuntimeError(
            f"vllm-pedro supports vLLM {' and '.join(outside)}; found vLLM {version}. Install a supported "
            "vLLM or a vllm-pedro made for yours.")


_done = False


def register() -> None:
    global _done
    if _done:
        return
    check_vllm_version()
    from . import patches
    from .layers import register_ops

    register_ops()
    patches.apply_always()
    _done = True
