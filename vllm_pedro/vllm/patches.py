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


def patch_async_llm_pedro_requests() -> None:
    """vLLM 0.32.x (AsyncLLM.add_request of vllm/v1/engine/async_llm.py, 0.32.0): the
    OpenAI server routes a PEDRO adapter like a LoRA, as a serving.PedroLoRARequest in
    OpenAIServingModels.lora_requests. Here, where every generate / beam-search request
    enters the engine client, such a request becomes what the offline API sends: the
    sampling params of offline.pedro_params, a prompt salted with offline.cache_salt
    when prefix caching is on, and no LoRA request. Other requests pass unchanged."""
    import inspect

    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.add_request
    if getattr(original, "_pedro_wrapped", False):
        return
    signature = inspect.signature(original)

    async def add_request(self, *args, **kwargs):
        from .offline import pedro_params, salted_prompt
        from .serving import is_pedro

        bound = signature.bind(self, *args, **kwargs)
        lora = bound.arguments.get("lora_request")
        if is_pedro(lora):
            req = lora.pedro_request()
            prompt = bound.arguments["prompt"]
            if not isinstance(bound.arguments["params"], SamplingParams):
                raise ValueError(f"PEDRO adapter {req.name!r}: PEDRO adapters serve text generation only")
            if not isinstance(prompt, (str, dict)):
                raise ValueError(f"PEDRO adapter {req.name!r}: {type(prompt).__name__} prompts are not "
                                 "supported (rendered token or text prompts only)")
            bound.arguments["prompt"] = salted_prompt(
                prompt, req, bool(self.vllm_config.cache_config.enable_prefix_caching))
            bound.arguments["params"] = pedro_params(bound.arguments["params"], req)
            bound.arguments["lora_request"] = None
        return await original(*bound.args, **bound.kwargs)

    add_request._pedro_wrapped = True
    add_request.__wrapped__ = original
    AsyncLLM.add_request = add_request


def patch_beam_search_refuses_pedro() -> None:
    """vLLM 0.32.x (BeamSearchOnlineMixin.beam_search of
    vllm/entrypoints/generate/beam_search/online.py, 0.32.0): online beam search runs
    every beam step as a new request whose prompt is the prompt plus the beam so far, so
    a PEDRO tenant would get vectors computed from that longer prompt at every step,
    which is not the adapter's function. Refuse it with a clear error instead (the
    offline LLM.beam_search takes no PEDRO adapter at all)."""
    import inspect

    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    original = BeamSearchOnlineMixin.beam_search
    if getattr(original, "_pedro_wrapped", False):
        return
    signature = inspect.signature(original)

    async def beam_search(self, *args, **kwargs):
        from .serving import is_pedro

        lora = signature.bind(self, *args, **kwargs).arguments.get("lora_request")
        if is_pedro(lora):
            raise ValueError(f"PEDRO adapter {lora.lora_name!r}: beam search is not supported with PEDRO "
                             "adapters (use greedy or sampling)")
        async for out in original(self, *args, **kwargs):
            yield out

    beam_search._pedro_wrapped = True
    beam_search.__wrapped__ = original
    BeamSearchOnlineMixin.beam_search = beam_search


def patch_engine_args_pedro_flags() -> None:
    """vLLM 0.32.x (EngineArgs.add_cli_args / from_cli_args of vllm/engine/arg_utils.py,
    0.32.0): the PEDRO flags (--enable-pedro, --pedro-modules, ...) in every parser vLLM
    builds from its engine arguments (`vllm serve`, `python -m
    vllm.entrypoints.openai.api_server`, `vllm-pedro serve`); general plugins are loaded
    before those parsers are built. from_cli_args copies only dataclass fields, so with
    --enable-pedro the flags are first turned into engine arguments (worker_cls,
    enable_chunked_prefill=False, additional_config["pedro"]) by
    cli_serve.apply_pedro_args."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_pedro_wrapped", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        from .cli_serve import add_pedro_cli_args

        parser = original_add(parser, *args, **kwargs)
        add_pedro_cli_args(parser)
        return parser

    def from_cli_args(cls, args):
        if getattr(args, "enable_pedro", False):
            from .cli_serve import apply_pedro_args

            apply_pedro_args(args)
        return original_from(cls, args)

    add_cli_args._pedro_wrapped = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


PATCHES = {"llm_alias": patch_llm_alias, "async_llm_pedro_requests": patch_async_llm_pedro_requests,
           "beam_search_refuses_pedro": patch_beam_search_refuses_pedro,
           "engine_args_pedro_flags": patch_engine_args_pedro_flags}


def apply_all() -> None:
    for name, fn in PATCHES.items():
        if name not in _applied:
            fn()
            _applied.add(name)
