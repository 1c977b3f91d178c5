"""The register of every vLLM internal vllm-pedro touches, as data.

Public extension points need no entry: the `vllm.general_plugins` entry point,
`worker_cls`, `scheduler_cls`, `additional_config`, `SamplingParams.extra_args`, custom
ops, `vllm.endpoint_plugins`. Everything else is listed in REGISTER with what it touches,
why, the vLLM versions it was written for, when it is active, and a `check` that
tests/test_patches.py runs: it fails, naming the entry, when vLLM changes under it.

Kinds: "wrap" (a monkey-patch this module applies), "override" (a private method a PEDRO
subclass overrides), "read" / "write" (private state used), "swap" (a class changed on a
live object). Active: "pedro" entries take effect only where PEDRO is enabled (wraps are
applied by `enable_pedro()`, called when --enable-pedro is parsed or a PEDRO server
starts; overrides live in classes only a PEDRO engine uses); "pedro-lora" ones only in a
PEDRO worker with vLLM's LoRA on the CPU (`enable_pedro_lora()`); "always" entries are
inert without --enable-pedro. A vLLM user with this package installed and PEDRO off runs stock
vLLM: `vllm.LLM` is vLLM's class and no vLLM function is wrapped but EngineArgs' parser and
the serve command's exit code (both inert without --enable-pedro).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("vllm_pedro")
VLLM_RANGE = ">=0.32.0,<0.33.0"  # every entry below was written and tested against vLLM 0.32.0


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # what it touches, as a dotted path
    kind: str  # wrap | override | read | write | swap
    active: str  # always | pedro
    why: str
    check: Callable[[], None]  # raises AssertionError naming what moved
    apply: Callable[[], None] | None = None  # for kind "wrap"
    vllm: str = VLLM_RANGE


def _wrapped(fn) -> bool:
    return getattr(fn, "_pedro_wrapped", False)


def _wrap(owner, name: str, build: Callable) -> None:
    """owner.name = build(original), once; the wrapper is marked and keeps the original
    as __wrapped__ (the checks read it)."""
    original = getattr(owner, name)
    if _wrapped(original):
        return
    wrapper = build(original)
    wrapper._pedro_wrapped = True
    wrapper.__wrapped__ = original
    setattr(owner, name, wrapper)


def _params(fn, *names: str, where: str) -> None:
    have = list(inspect.signature(fn).parameters)
    missing = [n for n in names if n not in have]
    assert not missing, f"{where} lost parameter(s) {missing}; has {have}"


def _source_has(fn, needle: str, where: str) -> None:
    assert needle in inspect.getsource(fn), f"{where} no longer contains {needle!r}"


# -- wraps ------------------------------------------------------------------------------
def _apply_engine_args_flags() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if _wrapped(EngineArgs.add_cli_args):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        from .args import add_cli_args as add_pedro

        parser = original_add(parser, *args, **kwargs)
        add_pedro(parser)
        return parser

    def from_cli_args(cls, args):
        if getattr(args, "enable_pedro", False):
            from .args import apply_cli_args

            apply_cli_args(args)
            enable_pedro()  # this process serves PEDRO: its front-end wraps go on now
        return original_from(cls, args)

    add_cli_args._pedro_wrapped = True
    add_cli_args.__wrapped__ = original_add
    from_cli_args._pedro_wrapped = True
    from_cli_args.__wrapped__ = original_from
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def _check_engine_args_flags() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add = getattr(EngineArgs.add_cli_args, "__wrapped__", EngineArgs.add_cli_args)
    _params(add, "parser", where="EngineArgs.add_cli_args")
    src = inspect.getsource(EngineArgs.from_cli_args.__func__ if not _wrapped(EngineArgs.from_cli_args)
                            else EngineArgs.from_cli_args.__wrapped__)
    assert "dataclasses.fields" in src or "fields(" in src, "EngineArgs.from_cli_args no longer copies fields"


def _apply_serve_exit_code() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand

    original = ServeSubcommand.cmd  # a staticmethod: the function itself
    if _wrapped(original):
        return

    def cmd(args):
        original(args)
        if getattr(args, "enable_pedro", False):
            from .serving import engine_died

            if engine_died():
                logger.error("vLLM's engine died (it was not shut down); exiting with code 1")
                raise SystemExit(1)

    cmd._pedro_wrapped = True
    cmd.__wrapped__ = original
    ServeSubcommand.cmd = staticmethod(cmd)


def _check_serve_exit_code() -> None:
    from vllm.entrypoints.cli import main as cli_main
    from vllm.entrypoints.cli.serve import ServeSubcommand

    assert isinstance(inspect.getattr_static(ServeSubcommand, "cmd"), staticmethod), "ServeSubcommand.cmd is no " \
        "staticmethod"
    _source_has(cli_main.main, "set_defaults(dispatch_function=cmd.cmd)", "vllm.entrypoints.cli.main.main")
    from vllm.v1.engine.utils import CoreEngineProcManager

    _source_has(CoreEngineProcManager.monitor_engine_liveness, "self.failed_proc_name = proc.name",
                "CoreEngineProcManager.monitor_engine_liveness")


def _apply_add_request() -> None:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    def build(original):
        signature = inspect.signature(original)

        async def add_request(self, *args, **kwargs):
            from vllm.exceptions import VLLMValidationError

            from .request import EXTRA_ARGS_KEY, salted_prompt, with_pedro
            from .serving import current_registry, is_pedro

            bound = signature.bind(self, *args, **kwargs)
            lora, params = bound.arguments.get("lora_request"), bound.arguments["params"]
            if EXTRA_ARGS_KEY in (getattr(params, "extra_args", None) or {}):
                raise VLLMValidationError(f"the extra argument key {EXTRA_ARGS_KEY!r} (vllm_xargs) is reserved for "
                                          "PEDRO; choose a tenant with \"model\"", parameter="vllm_xargs")
            if is_pedro(lora):
                req, reg = lora.pedro_request(), current_registry()
                prompt = bound.arguments["prompt"]
                if not isinstance(params, SamplingParams):
                    raise VLLMValidationError(f"PEDRO adapter {req.name!r}: PEDRO adapters serve text generation only")
                if not isinstance(prompt, (str, dict)):
                    raise VLLMValidationError(f"PEDRO adapter {req.name!r}: {type(prompt).__name__} prompts are not "
                                              "supported (rendered token or text prompts only)")
                bound.arguments["prompt"] = salted_prompt(prompt, req, reg.secret, reg.prefix_caching)
                bound.arguments["params"] = with_pedro(params, req)
                bound.arguments["lora_request"] = None
            return await original(*bound.args, **bound.kwargs)

        return add_request

    _wrap(AsyncLLM, "add_request", build)


def _check_add_request() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    _params(getattr(AsyncLLM.add_request, "__wrapped__", AsyncLLM.add_request), "prompt", "params",
            "lora_request", where="AsyncLLM.add_request")


def _apply_generate_errors() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    def build(original):
        async def generate(self, *args, **kwargs):
            from .request import ERROR_PREFIX
            from .serving import PedroAdapterError

            async for out in original(self, *args, **kwargs):
                failed = out.outputs[0] if out.finished and out.outputs else None
                if failed is not None and failed.finish_reason == "error" \
                        and str(failed.stop_reason or "").startswith(ERROR_PREFIX):
                    raise PedroAdapterError(str(failed.stop_reason))
                yield out
        return generate

    _wrap(AsyncLLM, "generate", build)


def _check_generate_errors() -> None:
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.v1.engine.async_llm import AsyncLLM

    assert inspect.isasyncgenfunction(getattr(AsyncLLM.generate, "__wrapped__", AsyncLLM.generate)), \
        "AsyncLLM.generate is no async generator"
    _source_has(GenerateBaseServing._raise_if_error, '"error"', "GenerateBaseServing._raise_if_error")


def _apply_beam_search_refusal() -> None:
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    def build(original):
        signature = inspect.signature(original)

        async def beam_search(self, *args, **kwargs):
            from .serving import is_pedro

            lora = signature.bind(self, *args, **kwargs).arguments.get("lora_request")
            if is_pedro(lora):
                raise ValueError(f"PEDRO adapter {lora.lora_name!r}: beam search is not supported with PEDRO "
                                 "adapters (use greedy or sampling)")
            async for out in original(self, *args, **kwargs):
                yield out
        return beam_search

    _wrap(BeamSearchOnlineMixin, "beam_search", build)


def _check_beam_search() -> None:
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    original = getattr(BeamSearchOnlineMixin.beam_search, "__wrapped__", BeamSearchOnlineMixin.beam_search)
    assert inspect.isasyncgenfunction(original), "BeamSearchOnlineMixin.beam_search is no async generator"
    _params(original, "lora_request", where="BeamSearchOnlineMixin.beam_search")


def _apply_check_model() -> None:
    from vllm.entrypoints.serve.engine.serving import BaseServing

    def build(original):
        async def _check_model(self, request):
            error = await original(self, request)
            from .serving import current_registry

            reg = current_registry()
            if error is None or reg is None or not reg.args.adapter_dir or error.error.code != 404:
                return error
            resolved = await reg.resolve(request.model)
            return error if resolved == "missing" else resolved
        return _check_model

    _wrap(BaseServing, "_check_model", build)


def _check_check_model() -> None:
    from vllm.entrypoints.serve.engine.serving import BaseServing

    original = getattr(BaseServing._check_model, "__wrapped__", BaseServing._check_model)
    assert inspect.iscoroutinefunction(original), "BaseServing._check_model is no coroutine"
    _source_has(original, "self.models.lora_requests", "BaseServing._check_model")
    _source_has(original, "NOT_FOUND", "BaseServing._check_model")


def _apply_endpoint_plugins() -> None:
    import vllm.plugins as plugins

    def build(original):
        def load_endpoint_plugins(*args, **kwargs):
            from .serving import PedroEndpoints

            loaded = original(*args, **kwargs)
            if not any(isinstance(p, PedroEndpoints) for p in loaded):
                loaded.append(PedroEndpoints())
            return loaded
        return load_endpoint_plugins

    _wrap(plugins, "load_endpoint_plugins", build)


def _check_endpoint_plugins() -> None:
    import vllm.plugins as plugins
    from vllm.entrypoints.launchers.app import build_app
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins

    _source_has(attach_endpoint_plugins, "from vllm.plugins import load_endpoint_plugins",
                "attach_endpoint_plugins (it must look the loader up at call time)")
    _source_has(build_app, "attach_endpoint_plugins", "build_app")
    assert callable(getattr(plugins, "load_endpoint_plugins", None)), "vllm.plugins.load_endpoint_plugins is gone"


def _apply_lora_routes_keep_tenants() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    def build(original):
        async def check(self, request):
            from .serving import is_pedro, pedro_name_error

            if is_pedro(self.lora_requests.get(request.lora_name)):
                return pedro_name_error(request.lora_name)
            return await original(self, request)
        return check

    _wrap(OpenAIServingModels, "_check_load_lora_adapter_request", build)
    _wrap(OpenAIServingModels, "_check_unload_lora_adapter_request", build)


def _check_lora_routes() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    for name in ("_check_load_lora_adapter_request", "_check_unload_lora_adapter_request"):
        fn = getattr(OpenAIServingModels, name)
        original = getattr(fn, "__wrapped__", fn)
        assert inspect.iscoroutinefunction(original), f"OpenAIServingModels.{name} is no coroutine"
        _params(original, "request", where=f"OpenAIServingModels.{name}")
    for fn in (OpenAIServingModels.load_lora_adapter, OpenAIServingModels.unload_lora_adapter):
        _source_has(fn, "error_check_ret = await self._check_", fn.__qualname__)


LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _apply_lora_base_rows() -> None:
    import vllm.lora.ops.torch_ops.lora_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    def build(original):
        def op(inputs, weights, output_tensor, lora_indices_tensor, *args, **kwargs):
            base = lora_indices_tensor < 0
            if base.shape[0] != output_tensor.shape[0] or not bool(base.any()):  # (a CPU tensor: no device sync)
                return original(inputs, weights, output_tensor, lora_indices_tensor, *args, **kwargs)
            kept = output_tensor[base].clone()
            original(inputs, weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
            output_tensor[base] = kept  # rows without a LoRA are left as they were, as the GPU kernels do
        return op

    for name in LORA_OPS:
        _wrap(torch_ops, name, build)  # sgmv_* call these through the module
        if getattr(punica_cpu, name) is not getattr(torch_ops, name):
            setattr(punica_cpu, name, getattr(torch_ops, name))  # punica_cpu imported them by name


def _check_lora_base_rows() -> None:
    """Fails when upstream vLLM fixed the bug (PR #48421): then drop this entry."""
    import torch
    import vllm.lora.ops.torch_ops.lora_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in LORA_OPS:
        assert hasattr(torch_ops, name) and hasattr(punica_cpu, name), f"vllm.lora.ops.torch_ops.{name} is gone"
        fn = getattr(torch_ops, name)
        _params(getattr(fn, "__wrapped__", fn), "inputs", "output_tensor", "lora_indices_tensor", where=name)
    expand = getattr(torch_ops.bgmv_expand, "__wrapped__", torch_ops.bgmv_expand)
    out = torch.zeros(2, 4)
    expand(torch.ones(2, 3), torch.ones(1, 4, 3), out, torch.tensor([0, -1]), add_inputs=True)
    assert out[1].abs().sum() > 0, ("vLLM's CPU LoRA op no longer applies the last LoRA slot to rows of index -1 "
                                    "(upstream fixed PR #48421): drop the patch 'lora_cpu_base_rows'")


# -- what PEDRO classes override, read, write or swap ---------------------------------------
def _check_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, params in {"_prepare_inputs": ["scheduler_output", "num_scheduled_tokens"],
                         "_update_states": ["scheduler_output"],
                         "_model_forward": ["input_ids", "positions"], "load_model": []}.items():
        fn = getattr(GPUModelRunner, name, None)
        assert fn is not None, f"GPUModelRunner.{name} is gone: PedroRunnerMixin overrides it"
        _params(fn, *params, where=f"GPUModelRunner.{name}")


def _check_runner_swap() -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (CPUWorker, Worker):
        for name in ("init_device", "determine_available_memory"):
            assert hasattr(cls, name), f"{cls.__name__}.{name} is gone: the PEDRO worker overrides it"
    _source_has(CPUWorker.init_device, "self.model_runner = CPUModelRunner(", "CPUWorker.init_device")
    _params(Worker._make_model_runner, "self", where="Worker._make_model_runner")
    _source_has(Worker._init_workspace_and_model_runner, "self._make_model_runner()",
                "Worker._init_workspace_and_model_runner")


def _check_input_batch() -> None:
    from vllm.v1.worker.gpu_input_batch import InputBatch

    for name in ("req_ids", "num_reqs"):
        assert hasattr(InputBatch, name), f"InputBatch.{name} is gone: runner.py reads it"
    _source_has(InputBatch.__init__, "self.req_id_to_index", "InputBatch.__init__")


def _check_scheduler() -> None:
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler

    _params(Scheduler._handle_blocked_waiting_request, "request", where="Scheduler._handle_blocked_waiting_request")
    _source_has(Scheduler.schedule, "self._handle_blocked_waiting_request(request)", "Scheduler.schedule")
    for name, params in {"add_request": ["request"], "finish_requests": ["request_ids", "finished_status"],
                         "_free_request": ["request"],
                         "update_from_output": ["scheduler_output", "model_runner_output"], "schedule": []}.items():
        _params(getattr(Scheduler, name), *params, where=f"Scheduler.{name}")
    fields = SchedulerOutput.__dataclass_fields__
    for name in ("scheduled_new_reqs", "scheduled_cached_reqs", "preempted_req_ids", "finished_req_ids"):
        assert name in fields, f"SchedulerOutput.{name} is gone: the PEDRO scheduler and runner read it"
    assert not hasattr(SchedulerOutput, "__slots__"), "SchedulerOutput has slots: the PEDRO plan rides on it"
    assert "resumed_req_ids" in CachedRequestData.__dataclass_fields__, "CachedRequestData.resumed_req_ids is gone"


def _check_step_budget() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from .scheduler import STEP_LOCALS

    code = Scheduler.schedule.__code__
    missing = STEP_LOCALS - set(code.co_varnames)
    assert not missing, f"Scheduler.schedule lost the local(s) {sorted(missing)} the PEDRO scheduler reads"
    _source_has(Scheduler.schedule, "request_token_budget = min(token_budget, input_budget - draft_slots)",
                "Scheduler.schedule")
    _source_has(Scheduler.schedule, "if 0 < long_prefill_token_threshold < num_new_tokens:", "Scheduler.schedule")
    _source_has(Scheduler.schedule, "ready_to_schedule = self._handle_blocked_waiting_request(request)",
                "Scheduler.schedule")


def _check_serving_models() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing

    for fn, needle in [(BaseServing._maybe_get_adapters, "self.models.lora_requests"),
                       (OpenAIServingModels.show_available_models, "self.lora_requests"),
                       (OpenAIServingModels.model_name, "lora_request.lora_name")]:
        _source_has(fn, needle, fn.__qualname__)
    assert hasattr(OpenAIServingModels, "is_base_model"), "OpenAIServingModels.is_base_model is gone"


def _check_serve_command() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args

    _params(ServeSubcommand.cmd, "args", where="ServeSubcommand.cmd")
    _params(make_arg_parser, "parser", where="make_arg_parser")
    _params(validate_parsed_serve_args, "args", where="validate_parsed_serve_args")


def _check_custom_op_helper() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    _params(direct_register_custom_op, "op_name", "op_func", "mutates_args", "fake_impl",
            where="direct_register_custom_op")


def _check_model_modules() -> None:
    import importlib

    from vllm.model_executor.models import registry
    from vllm.model_executor.models.transformers.base import Base
    from vllm.model_executor.models.transformers.fusers.base import local_output_sizes
    from vllm.model_executor.models.transformers.fusers.merged_column import MergedColumnParallelFuser
    from vllm.model_executor.models.transformers.fusers.qkv import QKVFuser

    from ..families import SUPPORTED

    for arch, family in SUPPORTED.items():
        backend = registry._TRANSFORMERS_SUPPORTED_MODELS.get(arch)
        native = registry._TEXT_GENERATION_MODELS.get(arch)
        assert (backend or native) is not None, f"vLLM's model registry no longer serves {arch}"
        assert (family.vllm == "transformers") == (native is None), (
            f"{arch}: families.py says vLLM serves it {family.vllm}, the registry says {backend or native}")
        if native is not None:  # the model class's modules, those it inherits from included (Phi-3: Llama's)
            cls = getattr(importlib.import_module(f"vllm.model_executor.models.{native[0]}"), native[1])
            source = "".join(inspect.getsource(inspect.getmodule(c)) for c in cls.__mro__
                             if c.__module__.startswith("vllm.model_executor.models."))
            for needle in ("qkv_proj",) if family.moe else ("qkv_proj", "gate_up_proj"):
                assert needle in source, f"vLLM's {native[0]}.py ({arch}) no longer has {needle}"
    _source_has(local_output_sizes, "output_sizes", "transformers backend local_output_sizes")
    _source_has(local_output_sizes, "tp_size", "transformers backend local_output_sizes")
    for fuser in (QKVFuser, MergedColumnParallelFuser):
        _source_has(fuser.update_attrs, "return_bias=False", f"{fuser.__name__}.update_attrs")
    _source_has(Base.forward, "input_ids[None, ...]", "transformers backend Base.forward (batch of one)")


REGISTER: list[Patch] = [
    Patch("engine_args_pedro_flags", "vllm.engine.arg_utils.EngineArgs.add_cli_args/from_cli_args", "wrap",
          "always", "The PEDRO flags in every parser vLLM builds from its engine arguments (vllm serve, "
          "vllm-pedro serve); from_cli_args copies only dataclass fields, so --enable-pedro is turned into "
          "engine arguments first (args.apply_cli_args) and switches this process's PEDRO wraps on. Inert "
          "without --enable-pedro.", _check_engine_args_flags, _apply_engine_args_flags),
    Patch("serve_exit_code", "vllm.entrypoints.cli.serve.ServeSubcommand.cmd (+ reads CoreEngineProcManager"
          ".failed_proc_name)", "wrap", "always", "vLLM's serve command returns normally when its engine died, so "
          "`vllm serve` exits 0 after an engine crash, like after a clean SIGTERM. With --enable-pedro a dead "
          "engine (a process of it exited non-zero while nobody stopped it) makes it exit 1. Inert without "
          "--enable-pedro.", _check_serve_exit_code, _apply_serve_exit_code),
    Patch("async_llm_pedro_requests", "vllm.v1.engine.async_llm.AsyncLLM.add_request", "wrap", "pedro",
          "Where every server request enters the engine client: a tenant (a PedroLoRARequest) becomes a PEDRO "
          "request (request.with_pedro, a salted prompt, no LoRA request); clients' vllm_xargs under the PEDRO "
          "key are refused.", _check_add_request, _apply_add_request),
    Patch("async_llm_pedro_errors", "vllm.v1.engine.async_llm.AsyncLLM.generate", "wrap", "pedro",
          "An adapter the engine cannot serve finishes its request with reason 'error' (scheduler.py); vLLM "
          "turns that into a 500 'Internal server error'. Raise a 400 naming the adapter instead.",
          _check_generate_errors, _apply_generate_errors),
    Patch("beam_search_refuses_pedro", "vllm.entrypoints.generate.beam_search.online.BeamSearchOnlineMixin"
          ".beam_search", "wrap", "pedro", "Online beam search re-sends prompt + beam as a new prompt every "
          "step, so a tenant would get vectors of a growing prompt: refuse it with a clear error.",
          _check_beam_search, _apply_beam_search_refusal),
    Patch("tenants_by_name", "vllm.entrypoints.serve.engine.serving.BaseServing._check_model", "wrap", "pedro",
          "With --pedro-adapter-dir a model name vLLM does not know is looked up there before vLLM's 404 (vLLM's "
          "LoRA resolvers run only with runtime LoRA updating on and load through the LoRA engine).",
          _check_check_model, _apply_check_model),
    Patch("pedro_endpoints_in_vllm_server", "vllm.plugins.load_endpoint_plugins", "wrap", "pedro",
          "vLLM loads endpoint plugins only when VLLM_PLUGINS names them; with --enable-pedro its server gets "
          "the PEDRO endpoints and tenant registry without that.", _check_endpoint_plugins, _apply_endpoint_plugins),
    Patch("lora_routes_keep_tenants", "vllm.entrypoints.openai.models.serving.OpenAIServingModels"
          "._check_load_lora_adapter_request/_check_unload_lora_adapter_request", "wrap", "pedro",
          "LoRA and PEDRO tenants share vLLM's one table of adapter names: /v1/load_lora_adapter (even with "
          "load_inplace) and /v1/unload_lora_adapter refuse a PEDRO tenant's name with a 400 that says so.",
          _check_lora_routes, _apply_lora_routes_keep_tenants),
    Patch("lora_cpu_base_rows", "vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink/bgmv_expand/bgmv_expand_slice "
          "(and their names in vllm.lora.punica_wrapper.punica_cpu)", "wrap", "pedro-lora",
          "vLLM's CPU LoRA ops index the stacked LoRA weights with the token's slot, and a token without a LoRA "
          "has slot -1, which indexes the last slot: base and PEDRO requests batched with LoRA requests get that "
          "LoRA applied (fixed upstream by vLLM PR #48421). Rows of slot -1 are left untouched, as vLLM's GPU "
          "kernels do. Applied in the PEDRO worker when LoRA is enabled on the CPU; the check fails once upstream "
          "is fixed.", _check_lora_base_rows, _apply_lora_base_rows),
    Patch("runner_hooks", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states/_prepare_inputs"
          "/_model_forward/load_model", "override", "pedro", "PedroRunnerMixin (runner.py) follows the runner's "
          "steps like vLLM's own LoRA mixin does: slots freed, the plan applied, the token -> slot map built.",
          _check_runner_hooks),
    Patch("runner_class", "vllm.v1.worker.cpu_worker.CPUWorker.init_device (swap); "
          "vllm.v1.worker.gpu_worker.Worker._make_model_runner (override)", "swap", "pedro",
          "The PEDRO worker (worker_cls) runs a model runner with PedroRunnerMixin: the GPU worker builds it "
          "in vLLM's _make_model_runner override point; the CPU worker builds its runner inside init_device, "
          "so the live runner's class is swapped there.", _check_runner_swap),
    Patch("input_batch", "vllm.v1.worker.gpu_input_batch.InputBatch.req_ids/num_reqs/req_id_to_index", "read",
          "pedro", "The batch order of requests, for the token -> slot map.", _check_input_batch),
    Patch("scheduler_hooks", "vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request, "
          "_free_request (+ add_request, finish_requests, schedule, update_from_output; SchedulerOutput fields)",
          "override",
          "pedro", "The PEDRO scheduler (scheduler_cls; vLLM calls its interface not public): adapters loaded "
          "while requests wait, distinct adapters per step bounded by the device rows, the PedroStepPlan "
          "attached to the scheduler output, failed requests finished alone.", _check_scheduler),
    Patch("scheduler_step_budget", "vllm.v1.core.sched.scheduler.Scheduler.schedule (locals token_budget, "
          "input_budget, draft_slots, long_prefill_token_threshold)", "read", "pedro",
          "A PEDRO prompt is prefilled whole, so the PEDRO scheduler admits it only when the step has room for "
          "all of it; vLLM keeps that room in schedule()'s locals, which the waiting-request hook reads from "
          "schedule's frame (scheduler.step_room). Chunked prefill stays on for every other request.",
          _check_step_budget),
    Patch("serving_models_registry", "vllm.entrypoints.openai.models.serving.OpenAIServingModels.lora_requests",
          "write", "pedro", "Tenants are PedroLoRARequests in vLLM's LoRA registry, so vLLM's routing, 404s and "
          "/v1/models serve them.", _check_serving_models),
    Patch("serve_command", "vllm.entrypoints.cli.serve.ServeSubcommand.cmd", "read", "pedro",
          "vllm-pedro serve is vLLM's serve command with vLLM's parser plus the PEDRO flags.", _check_serve_command),
    Patch("model_modules", "decoder layers of vLLM's models (self_attn.qkv_proj, mlp.gate_up_proj, the mlp's "
          "SiluAndMul) and of its Transformers backend (fused qkv_proj / gate_up_proj, return_bias=False, a batch "
          "of one, its rewritten forward reading .output_sizes/.tp_size)", "write", "pedro",
          "PEDRO wraps each layer's qkv_proj and the FFN's activation or gate_up_proj (layers.wrap_model) for the "
          "families of families.SUPPORTED, native or served through the Transformers backend.",
          _check_model_modules),
    Patch("custom_op_helper", "vllm.utils.torch_utils.direct_register_custom_op", "read", "pedro",
          "How vLLM registers its own custom ops; the PEDRO ops use the same helper.", _check_custom_op_helper),
]

_WRAPS = {p.name: p for p in REGISTER if p.kind == "wrap"}
_applied: set[str] = set()


def apply_always() -> None:
    """What the general plugin applies in every process (inert without --enable-pedro)."""
    _apply("always")


def enable_pedro() -> None:
    """This process serves PEDRO: apply the front-end wraps (idempotent)."""
    _apply("always")
    _apply("pedro")


def enable_pedro_lora() -> None:
    """This worker serves LoRA beside PEDRO on the CPU: fix the LoRA ops' base rows."""
    _apply("pedro-lora")


def _apply(active: str) -> None:
    for name, p in _WRAPS.items():
        if p.active == active and name not in _applied:
            p.apply()
            _applied.add(name)


def applied() -> set[str]:
    return set(_applied)
