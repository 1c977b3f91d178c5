"""Every monkey-patch vllm-pedro makes, in one place. Each names the vLLM versions it
was written for; tests/test_patches.py fails loudly when vLLM changes under one.

Everything else uses public extension points: the general-plugin entry point,
`worker_cls`, `additional_config`, `SamplingParams.extra_args`, custom ops."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_pedro")
_applied: set[str] = set()


def patch_llm_alias() -> None:
    """vLLM 0.32.x: make `vllm.LLM` the PEDRO-aware subclass, so `LLM(model,
    enable_pedro=True)` works after `import vllm_pedro` as the issue's API asks.
    Without enable_pedro it is exactly vllm.LLM."""
    import vllm

    from .offline import LLM

    vllm.LLM = LLM


PATCHES = {"llm_alias": patch_llm_alias}


def apply_all() -> None:
    for name, fn in PATCHES.items():
        if name not in _applied:
            fn()
            _applied.add(name)
