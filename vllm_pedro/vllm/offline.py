"""The offline API, mirroring vLLM's LoRA API:

    llm = LLM(model, enable_pedro=True, max_pedro_adapters=4)
    llm.generate(prompts, params, pedro_request=PedroRequest("tenant-a", 1, "/path/a"))

`pedro_request` is one request for all prompts, or a list with one per prompt (None for
the base model). A request whose adapter is missing or does not fit the model fails
alone: its output has finish_reason "error" and the message in `pedro_error`; the
other prompts of the call still run."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import vllm
from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput

from ..adapter_io import load_adapter
from ..config import AdapterError
from .args import PedroArgs, engine_kwargs
from .runner import EXTRA_ARGS_KEY, base_shapes_from_hf_config

logger = logging.getLogger("vllm_pedro")


@dataclass(frozen=True)
class PedroRequest:
    """Which adapter a request uses: a unique name, a unique positive integer id, a path."""

    name: str
    int_id: int
    path: str

    def __post_init__(self):
        if not isinstance(self.int_id, int) or self.int_id < 1:
            raise ValueError(f"PedroRequest int_id must be a positive integer, got {self.int_id!r}")


def cache_salt(req: PedroRequest) -> str:
    # KV written by a PEDRO request depends on its adapter: never share it with the base
    # or other tenants. (PEDRO requests also never *read* the prefix cache; see below.)
    return f"pedro:{req.int_id}:{req.name}"


class AdapterValidator:
    """Checks adapters in the front end, before a request reaches the engine, so a bad
    adapter fails its request and nothing else."""

    def __init__(self, hf_config, args: PedroArgs):
        self.base = base_shapes_from_hf_config(hf_config)
        self.args = args
        self._ok: dict[tuple[int, str], str] = {}  # (int_id, path) -> name

    def check(self, req: PedroRequest) -> None:
        key = (req.int_id, req.path)
        if self._ok.get(key) == req.name:
            return
        for (int_id, path), name in self._ok.items():
            if int_id == req.int_id and (path, name) != (req.path, req.name):
                raise AdapterError(f"adapter id {req.int_id} is already used by {name!r} at {path!r}")
        config, _ = load_adapter(req.path, base=self.base)
        if config.r > self.args.max_rank:
            raise AdapterError(f"adapter {req.name!r} has rank {config.r} > max_pedro_rank={self.args.max_rank}")
        extra = [t for t in config.targets if t not in self.args.targets]
        if extra:
            raise AdapterError(f"adapter {req.name!r} targets {extra}, not served (pedro_targets="
                               f"{list(self.args.targets)})")
        self._ok[key] = req.name

    def forget(self, int_id: int) -> None:
        for key in [k for k in self._ok if k[0] == int_id]:
            del self._ok[key]


def pedro_params(params: SamplingParams, req: PedroRequest) -> SamplingParams:
    params = copy.deepcopy(params)
    params.extra_args = {**(params.extra_args or {}),
                         EXTRA_ARGS_KEY: {"name": req.name, "int_id": req.int_id, "path": req.path}}
    # A PEDRO prompt must be prefilled whole (its vectors come from all of it), so it
    # never starts from cached KV.
    params.skip_reading_prefix_cache = True
    return params


def salted_prompt(prompt, req: PedroRequest, prefix_caching: bool):
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    elif isinstance(prompt, dict):
        prompt = dict(prompt)
    else:
        raise TypeError(f"PEDRO requests take str or dict prompts, got {type(prompt).__name__}")
    if prefix_caching:
        prompt["cache_salt"] = cache_salt(req)
    return prompt


def error_output(request_id: str, prompt, message: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    out = RequestOutput(request_id=request_id, prompt=text, prompt_token_ids=None, prompt_logprobs=None,
                        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None,
                                                  logprobs=None, finish_reason="error", stop_reason=message)],
                        finished=True)
    out.pedro_error = message
    return out


class LLM(vllm.LLM):
    """vllm.LLM with PEDRO adapters (enable_pedro=True). Without it, exactly vllm.LLM."""

    def __init__(self, model: str, *, enable_pedro: bool = False, max_pedro_adapters: int = 4,
                 max_pedro_rank: int = 16, pedro_targets=("q", "v", "up"), **kwargs):
        self.pedro_args = None
        if enable_pedro:
            from vllm.platforms import current_platform

            self.pedro_args = PedroArgs(max_adapters=max_pedro_adapters, max_rank=max_pedro_rank,
                                        targets=tuple(pedro_targets))
            extra = engine_kwargs(self.pedro_args, current_platform.device_type)
            kwargs["additional_config"] = {**(kwargs.get("additional_config") or {}), **extra.pop("additional_config")}
            if kwargs.get("enable_chunked_prefill"):
                raise ValueError("PEDRO needs every prompt prefilled in one step: enable_chunked_prefill "
                                 "must stay off")
            kwargs.update(extra)
        super().__init__(model, **kwargs)
        if enable_pedro:
            cfg = self.llm_engine.vllm_config
            self._pedro_validator = AdapterValidator(cfg.model_config.hf_config, self.pedro_args)
            self._prefix_caching = bool(cfg.cache_config.enable_prefix_caching)

    def generate(self, prompts, sampling_params=None, *args, pedro_request=None, **kwargs):
        if pedro_request is None:
            return super().generate(prompts, sampling_params, *args, **kwargs)
        if self.pedro_args is None:
            raise ValueError("pedro_request given but this LLM was created without enable_pedro=True")
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        reqs = list(pedro_request) if isinstance(pedro_request, (list, tuple)) else [pedro_request] * n
        if len(reqs) != n:
            raise ValueError(f"got {len(reqs)} pedro requests for {n} prompts")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        run_prompts, run_params, run_index, errors = [], [], [], {}
        for i, (p, sp, req) in enumerate(zip(prompts, params, reqs)):
            if req is not None:
                try:
                    self._pedro_validator.check(req)
                except (AdapterError, OSError) as e:
                    logger.error("PEDRO request %d failed: %s", i, e)
                    errors[i] = error_output(f"pedro-error-{i}", p, f"PEDRO adapter {req.name!r}: {e}")
                    continue
                p, sp = salted_prompt(p, req, self._prefix_caching), pedro_params(sp, req)
            run_prompts.append(p)
            run_params.append(sp)
            run_index.append(i)
        outs = super().generate(run_prompts, run_params, *args, **kwargs) if run_prompts else []
        merged = [None] * n
        for i, o in zip(run_index, outs):
            merged[i] = o
        for i, o in errors.items():
            merged[i] = o
        return merged
