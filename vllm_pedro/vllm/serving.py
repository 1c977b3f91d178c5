"""PEDRO in vLLM's OpenAI-compatible server.

How a PEDRO adapter rides vLLM's own LoRA routing, so that every OpenAI endpoint that
takes a LoRA by `"model": name` (completions, chat, streaming, beam search, tokenize)
takes a PEDRO adapter the same way, with vLLM's own errors and responses:

* Every served PEDRO adapter is a `PedroLoRARequest` (a LoRARequest subclass) in
  `OpenAIServingModels.lora_requests`. vLLM's `_check_model` then accepts its name (an
  unknown name gets vLLM's own 404), `_maybe_get_adapters` picks it, responses report
  its name as "model", and `/v1/models` lists it with the base model as parent.
* `AsyncLLM.add_request` (patches.patch_async_llm_pedro_requests) turns a
  PedroLoRARequest into what the offline API sends: `pedro_params(...)`, a salted prompt,
  and no LoRA request. The engine never sees the LoRARequest.
* `POST /v1/load_pedro_adapter` and `/v1/unload_pedro_adapter` exist only when
  VLLM_ALLOW_RUNTIME_PEDRO_UPDATING is true, and load only from directories under
  --pedro-allowed-roots.

`PedroEndpoints` is a `vllm.endpoint_plugins` plugin (attach_router / init_state):
`vllm-pedro serve` (cli_serve.py) calls it directly; vLLM's own server loads it when the
entry point `pedro = vllm_pedro.vllm.serving:PedroEndpoints` is registered in that group
and VLLM_PLUGINS names "pedro".
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from http import HTTPStatus

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from vllm.lora.request import LoRARequest

from ..config import AdapterError
from .args import PedroArgs, pedro_enabled
from .offline import AdapterValidator, PedroRequest

logger = logging.getLogger("vllm_pedro")

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_PEDRO_UPDATING"


def runtime_updating_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true")


class PedroLoRARequest(LoRARequest):  # msgspec.Struct subclass
    """A PEDRO adapter in vLLM's LoRA registry. lora_int_id is the PEDRO adapter id."""

    def pedro_request(self) -> PedroRequest:
        return PedroRequest(self.lora_name, self.lora_int_id, self.lora_path)


def is_pedro(lora_request) -> bool:
    return isinstance(lora_request, PedroLoRARequest)


def path_under_roots(path: str, roots: list[str]) -> str | None:
    """The real path of `path` if it lies inside one of `roots` (after resolving every
    symlink and `..` of both), else None."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        try:
            if os.path.commonpath([real, r]) == r:
                return real
        except ValueError:  # different drives
            continue
    return None


def _error(message: str, err_type: str = "BadRequestError", status: HTTPStatus = HTTPStatus.BAD_REQUEST,
           param: str | None = None):
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status, param=param)


class PedroAdapterRegistry:
    """The front end's PEDRO adapters: names in vLLM's serving models, validated files."""

    def __init__(self, serving_models, vllm_config, allowed_roots: list[str] | None = None):
        self.models = serving_models
        self.args = PedroArgs.from_vllm_config(vllm_config)
        self.validator = AdapterValidator(vllm_config.model_config.hf_config, self.args)
        self.allowed_roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self._next_id = 1
        self._lock = asyncio.Lock()

    # -- what is served ------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n, r in self.models.lora_requests.items() if is_pedro(r)]

    def _check_name(self, name: str):
        if not name:
            return _error("'pedro_name' must be a non-empty string.", "InvalidUserInput", param="pedro_name")
        if self.models.is_base_model(name):
            return _error(f"The PEDRO adapter name '{name}' conflicts with a served base model.",
                          "InvalidUserInput", param="pedro_name")
        if name in self.models.lora_requests:
            kind = "PEDRO" if is_pedro(self.models.lora_requests[name]) else "LoRA"
            return _error(f"The name '{name}' is already used by a loaded {kind} adapter; unload it "
                          "first.", "InvalidUserInput", param="pedro_name")
        return None

    def _base_model_name(self, base_model_name: str | None) -> str | None:
        if base_model_name is None:
            return None
        if not self.models.is_base_model(base_model_name):
            served = ", ".join(m.name for m in self.models.base_model_paths)
            raise AdapterError(f"base_model_name {base_model_name!r} is not a served model (served: {served})")
        return base_model_name

    def _add(self, name: str, path: str, base_model_name: str | None = None) -> PedroLoRARequest:
        """Validate (raises AdapterError / OSError) and register. Adapter ids are never
        reused, so a worker's cached copy of an unloaded adapter can never be mistaken for
        a new one, and the KV cache salt differs."""
        int_id = self._next_id
        req = PedroRequest(name, int_id, path)
        self.validator.check(req)
        self._next_id += 1
        lora = PedroLoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path,
                                base_model_name=self._base_model_name(base_model_name))
        self.models.lora_requests[name] = lora
        logger.info("PEDRO adapter '%s' (id %d) served from %s", name, int_id, path)
        return lora

    def add_static(self, modules) -> None:
        """The --pedro-modules of the command line; any failure stops the server start."""
        for m in modules:
            err = self._check_name(m.name)
            if err is not None:
                raise ValueError(err.error.message)
            try:
                self._add(m.name, m.path, m.base_model_name)
            except (AdapterError, OSError) as e:
                raise ValueError(f"--pedro-modules {m.name}={m.path}: {e}") from e

    # -- runtime updating ----------------------------------------------------------------
    async def load(self, name: str | None, path: str | None):
        if not name or not path:
            return _error("Both 'pedro_name' and 'pedro_path' must be provided.", "InvalidUserInput")
        if not self.allowed_roots:
            return _error("Runtime loading of PEDRO adapters is disabled: the server was started "
                          "without --pedro-allowed-roots.", "InvalidUserInput", param="pedro_path")
        real = path_under_roots(path, self.allowed_roots)
        if real is None:
            return _error(f"The path '{path}' is not inside an allowed root (--pedro-allowed-roots).",
                          "InvalidUserInput", param="pedro_path")
        async with self._lock:
            err = self._check_name(name)
            if err is not None:
                return err
            try:
                # Reads and checks the whole adapter: off the event loop.
                await asyncio.to_thread(self.validator.check, PedroRequest(name, self._next_id, real))
                self._add(name, real)
            except (AdapterError, OSError, ValueError) as e:
                self.validator.forget(self._next_id)
                return _error(f"Cannot load PEDRO adapter '{name}' from '{path}': {e}", "InvalidUserInput",
                              param="pedro_path")
        return f"Success: PEDRO adapter '{name}' added successfully."

    async def unload(self, name: str | None):
        if not name:
            return _error("'pedro_name' needs to be provided to unload a PEDRO adapter.", "InvalidUserInput")
        async with self._lock:
            lora = self.models.lora_requests.get(name)
            if not is_pedro(lora):
                return _error(f"The PEDRO adapter '{name}' cannot be found.", "NotFoundError",
                              HTTPStatus.NOT_FOUND, param="pedro_name")
            # Requests already admitted keep their adapter (their sampling params name its
            # path and id); new requests for this name get vLLM's 404.
            del self.models.lora_requests[name]
            self.validator.forget(lora.lora_int_id)
        logger.info("PEDRO adapter '%s' unloaded", name)
        return f"Success: PEDRO adapter '{name}' removed successfully."


class PedroEndpoints:
    """The HTTP side of PEDRO, in the shape of a `vllm.endpoint_plugins` plugin."""

    name = "pedro"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        if not runtime_updating_allowed():
            return
        from fastapi.responses import JSONResponse, Response

        logger.warning("PEDRO runtime adapter loading & unloading is enabled in the API server "
                       "(%s). Only directories under --pedro-allowed-roots can be loaded.",
                       RUNTIME_UPDATING_ENV)

        def reply(result):
            if isinstance(result, str):
                return Response(status_code=200, content=result)
            return JSONResponse(content=result.model_dump(), status_code=result.error.code)

        async def body(raw: Request):
            try:
                data = await raw.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                return None
            return {k: v if isinstance(v, str) else None for k, v in data.items()}

        def registry(raw: Request) -> PedroAdapterRegistry | None:
            return getattr(raw.app.state, "pedro_registry", None)

        async def load_pedro_adapter(raw_request: Request):
            reg, data = registry(raw_request), await body(raw_request)
            if reg is None:
                return reply(_error("PEDRO is not enabled on this server (--enable-pedro)."))
            if data is None:
                return reply(_error("Expected a JSON object {\"pedro_name\": ..., \"pedro_path\": ...}."))
            return reply(await reg.load(data.get("pedro_name"), data.get("pedro_path")))

        async def unload_pedro_adapter(raw_request: Request):
            reg, data = registry(raw_request), await body(raw_request)
            if reg is None:
                return reply(_error("PEDRO is not enabled on this server (--enable-pedro)."))
            if data is None:
                return reply(_error("Expected a JSON object {\"pedro_name\": ...}."))
            return reply(await reg.unload(data.get("pedro_name")))

        app.add_api_route("/v1/load_pedro_adapter", load_pedro_adapter, methods=["POST"])
        app.add_api_route("/v1/unload_pedro_adapter", unload_pedro_adapter, methods=["POST"])

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None or not pedro_enabled(engine_client.vllm_config):
            return
        from . import patches

        patches.apply_all()  # the add_request hook; a no-op where the plugin already ran
        reg = PedroAdapterRegistry(state.openai_serving_models, engine_client.vllm_config,
                                   getattr(args, "pedro_allowed_roots", None))
        reg.add_static(reg.args.modules)
        state.pedro_registry = reg
