"""The `vllm.general_plugins` entry point. vLLM calls `register()` in every process
(front end, engine core, workers) before it builds the engine."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_pedro")

# The vLLM versions this plugin was written and tested against (worker and model-runner
# hooks, see runner.py and patches.py). Outside it, refuse rather than misbehave.
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))  # [lower, upper)


def parse_version(text: str) -> tuple[int, int, int]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = len(piece) - len(piece.lstrip("0123456789"))
        parts.append(int(piece[:digits]) if digits else 0)  # "0rc1" -> 0
    return tuple((parts + [0, 0, 0])[:3])


def check_vllm_version(version: str | None = None) -> None:
    if version is None:
        import vllm
        version = vllm.__version__
    lo, hi = SUPPORTED_VLLM
    if not (lo <= parse_version(version) < hi):
        raise RuntimeError(
            f"vllm-pedro supports vLLM >={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}; "
            f"found vLLM {version}. Install a supported vLLM or a vllm-pedro made for yours.")


_done = False


def register() -> None:
    global _done
    if _done:
        return
    check_vllm_version()
    from . import patches
    from .layers import register_ops

    register_ops()
    patches.apply_all()
    _done = True
