"""The offline API, mirroring vLLM's LoRA API:

    llm = LLM(model, enable_pedro=True, max_pedro_adapters=4)
    llm.generate(prompts, params, pedro_request=PedroRequest("tenant-a", 1, "/path/a"))

`pedro_request` is one request for all prompts, or a list with one per prompt (None for
the base model); with `pedro_adapter_dir=DIR`, a tenant name stands for DIR/NAME. A
request whose adapter is missing, malformed or does not fit the model fails alone: its
output has finish_reason "error" and the message in `pedro_error`; the other prompts of
the call still run. That holds for what the front end finds (here) and for what the
engine finds later (an adapter changed on disk since it was validated).
"""

from __future__ import annotations

import logging
import secrets

import vllm
from vllm.outputs import CompletionOutput, RequestOutput

from ..adapter_io import adapter_dir_entry, parse_adapter, read_adapter_files
from ..config import AdapterError, BaseShapes
from ..families import architecture_of_config, check_hf_config, check_targets, early_hf_config
from ..hub import resolve_adapter
from .args import PedroArgs, merge_engine_kwargs
from .request import PedroRequest, check_servable, salted_prompt, with_pedro

logger = logging.getLogger("vllm_pedro")


class AdapterValidator:
    """Validates adapters in a front end, before a request reaches the engine, so a bad
    adapter fails its request and nothing else. Each adapter id is read and validated
    once; the request then carries the digest of the bytes that were validated."""

    def __init__(self, hf_config, args: PedroArgs):
        self.arch = architecture_of_config(hf_config)
        check_targets(self.arch, args.targets)  # the model's family and the served targets (families.py)
        self.base = BaseShapes.from_hf_config(hf_config)
        self.args = args
        self._ok: dict[int, PedroRequest] = {}  # int_id -> the validated request (a local folder)
        self._source: dict[int, str] = {}  # int_id -> the folder or Hub id it was given as

    def check(self, req: PedroRequest, allowed_roots: list[str] | None = None) -> PedroRequest:
        """`req` with the digest of its validated files; raises AdapterError."""
        done = self._ok.get(req.int_id)
        if done is not None:
            if done.name != req.name or req.path not in (done.path, self._source.get(req.int_id)):
                raise AdapterError(f"adapter id {req.int_id} is already used by {done.name!r} at {done.path!r}")
            return done
        path = resolve_adapter(req.path)  # a Hugging Face Hub id: its snapshot in the HF cache
        files = read_adapter_files(path, allowed_roots)
        config, _ = parse_adapter(files, self.base)
        check_targets(self.arch, config.targets)  # `up` on a mixture-of-experts model, said as such
        check_servable(config, self.args)
        done = self._ok[req.int_id] = PedroRequest(req.name, req.int_id, path, files.digest)
        self._source[req.int_id] = req.path
        return done

    def forget(self, int_id: int) -> None:
        self._ok.pop(int_id, None)
        self._source.pop(int_id, None)


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
                 max_cpu_pedro_adapters: int | None = None, max_pedro_rank: int = 16,
                 pedro_targets=("q", "v", "up"), pedro_adapter_dir: str | None = None, **kwargs):
        self.pedro_args = None
        if enable_pedro:
            from vllm.platforms import current_platform

            self.pedro_args = PedroArgs(max_adapters=max_pedro_adapters, max_cpu_adapters=max_cpu_pedro_adapters,
                                        max_rank=max_pedro_rank, targets=tuple(pedro_targets),
                                        adapter_dir=pedro_adapter_dir)
            kwargs = merge_engine_kwargs(kwargs, self.pedro_args, current_platform.device_type)
            hf_config = early_hf_config(model, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
            if hf_config is not None:  # refuse an unsupported model before an engine starts (families.py)
                check_hf_config(hf_config, self.pedro_args.targets)
        super().__init__(model, **kwargs)
        if enable_pedro:
            cfg = self.llm_engine.vllm_config
            self._pedro_validator = AdapterValidator(cfg.model_config.hf_config, self.pedro_args)
            self._prefix_caching = bool(cfg.cache_config.enable_prefix_caching)
            self._pedro_secret = secrets.token_hex(16)  # salts tenants' cached KV (request.cache_salt)
            self._pedro_names: dict[str, PedroRequest] = {}  # tenants resolved by name
            from .metrics import watch_engine

            watch_engine(self.pedro_args.stats_path, cfg.model_config.served_model_name)  # llm.get_metrics()

    def pedro_request(self, name: str) -> PedroRequest:
        """The tenant `name` of pedro_adapter_dir (one id per name for this LLM's life)."""
        req = self._pedro_names.get(name)
        if req is None:
            path = adapter_dir_entry(self.pedro_args.adapter_dir, name)
            req = self._pedro_names[name] = PedroRequest(name, 1_000_000 + len(self._pedro_names), path)
        return req

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
        loras = kwargs.pop("lora_request", None)  # vLLM's LoRA tenants, beside PEDRO ones
        loras = list(loras) if isinstance(loras, (list, tuple)) else [loras] * n
        if len(loras) != n:
            raise ValueError(f"got {len(loras)} LoRA requests for {n} prompts")
        both = [i for i, (lr, pr) in enumerate(zip(loras, reqs)) if lr is not None and pr is not None]
        if both:
            raise ValueError(f"prompt(s) {both} ask for a LoRA and a PEDRO adapter; a request takes one adapter")
        run_prompts, run_params, run_index, errors = [], [], [], {}
        for i, (p, sp, req) in enumerate(zip(prompts, params, reqs)):
            if req is not None:
                name = req if isinstance(req, str) else req.name
                try:
                    req = self._pedro_validator.check(self.pedro_request(req) if isinstance(req, str) else req)
                except (AdapterError, OSError) as e:
                    logger.error("PEDRO request %d failed: %s", i, e)
                    errors[i] = error_output(f"pedro-error-{i}", p, f"PEDRO adapter {name!r}: {e}")
                    continue
                p = salted_prompt(p, req, self._pedro_secret, self._prefix_caching)
                sp = with_pedro(sp, req)
            run_prompts.append(p)
            run_params.append(sp)
            run_index.append(i)
        if run_prompts:
            kwargs["lora_request"] = [loras[i] for i in run_index]
        outs = super().generate(run_prompts, run_params, *args, **kwargs) if run_prompts else []
        merged = [None] * n
        for i, o in zip(run_index, outs):
            if o.outputs and o.outputs[0].finish_reason == "error":  # failed in the engine (scheduler.py)
                o.pedro_error = str(o.outputs[0].stop_reason)
            merged[i] = o
        for i, o in errors.items():
            merged[i] = o
        return merged

