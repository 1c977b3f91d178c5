"""PEDRO in vLLM's OpenAI-compatible server.

A PEDRO tenant rides vLLM's own LoRA routing, so every endpoint that takes a LoRA by
`"model": name` (completions, chat, streaming, /v1/models) takes a tenant the same way,
with vLLM's own errors and responses:

* Every served tenant is a `PedroLoRARequest` (a LoRARequest subclass carrying the digest
  of its validated files) in `OpenAIServingModels.lora_requests`: vLLM's model check
  accepts the name, picks the request, reports the name as "model", lists it in
  /v1/models with the base model as parent; an unknown name gets vLLM's 404.
* With --pedro-adapter-dir, a name vLLM does not know is looked up there first
  (`PedroAdapterRegistry.resolve`): a valid folder is validated, registered and served;
  a malformed one is a 400 that names the problem.
* The engine client turns a PedroLoRARequest into a PEDRO request (request.with_pedro, a
  prompt salted with this server's secret) before the engine sees it, refuses clients'
  own `vllm_xargs` under the PEDRO key, and turns an adapter failure the engine reports
  into a 400 naming the adapter (patches.py holds those wrappers; --enable-pedro switches
  them on when it is parsed).
* `POST /v1/load_pedro_adapter` and `/v1/unload_pedro_adapter` exist only when
  VLLM_ALLOW_RUNTIME_PEDRO_UPDATING is true, and load only from --pedro-allowed-roots.

`PedroEndpoints` is a `vllm.endpoint_plugins` plugin (attach_router / init_state); the
PEDRO patches add it to vLLM's server when --enable-pedro is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from argparse import Namespace
from http import HTTPStatus

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from vllm.exceptions import VLLMClientError
from vllm.lora.request import LoRARequest

from ..adapter_io import adapter_dir_entry, is_under
from ..config import AdapterError
from .args import PedroArgs, pedro_enabled
from .offline import AdapterValidator
from .request import PedroRequest, tenant_name_problem

logger = logging.getLogger("vllm_pedro")

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_PEDRO_UPDATING"
_registry: PedroAdapterRegistry | None = None  # this process's server registry (one API server process)


def runtime_updating_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true")


class PedroLoRARequest(LoRARequest):  # msgspec.Struct subclass
    """A PEDRO tenant in vLLM's LoRA registry. lora_int_id is the PEDRO adapter id."""

    pedro_digest: str | None = None

    def pedro_request(self) -> PedroRequest:
        return PedroRequest(self.lora_name, self.lora_int_id, self.lora_path, self.pedro_digest)


def is_pedro(lora_request) -> bool:
    return isinstance(lora_request, PedroLoRARequest)


class PedroAdapterError(VLLMClientError):
    """A PEDRO adapter the engine could not serve (a 400 naming the adapter and the cause)."""


def current_registry() -> PedroAdapterRegistry | None:
    return _registry


def path_under_roots(path: str, roots: list[str]) -> str | None:
    """The real path of `path` if it lies inside one of `roots` (after resolving every
    symlink and `..` of both), else None."""
    real = os.path.realpath(path)
    return real if is_under(real, [os.path.realpath(r) for r in roots]) else None


def _error(message: str, err_type: str = "BadRequestError", status: HTTPStatus = HTTPStatus.BAD_REQUEST,
           param: str | None = None):
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status, param=param)


def pedro_name_error(name: str):
    """The LoRA routes' answer for a PEDRO tenant's name (patches.REGISTER)."""
    return _error(f"The name '{name}' is a loaded PEDRO adapter's; LoRA and PEDRO adapters share one set of names. "
                  "Unload it with /v1/unload_pedro_adapter first.", "InvalidUserInput")


class PedroAdapterRegistry:
    """The server's PEDRO tenants: names in vLLM's serving models, validated files."""

    def __init__(self, serving_models, vllm_config, allowed_roots: list[str] | None = None):
        self.models = serving_models
        self.args = PedroArgs.from_vllm_config(vllm_config)
        self.validator = AdapterValidator(vllm_config.model_config.hf_config, self.args)
        self.allowed_roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self.secret = secrets.token_hex(16)  # salts tenants' cached KV: no client can send it
        self._next_id = 1
        self._lock = asyncio.Lock()
        self._resolving: dict[str, asyncio.Lock] = {}

    # -- what is served ------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n, r in self.models.lora_requests.items() if is_pedro(r)]

    def _check_name(self, name: str):
        if not name:
            return _error("'pedro_name' must be a non-empty string.", "InvalidUserInput", param="pedro_name")
        problem = tenant_name_problem(name)
        if problem:
            return _error(f"The PEDRO adapter name {name!r} {problem}.", "InvalidUserInput", param="pedro_name")
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

    def _add(self, name: str, path: str, base_model_name: str | None = None,
             allowed_roots: list[str] | None = None) -> PedroLoRARequest:
        """Validate (raises AdapterError / OSError) and register. Adapter ids are never
        reused, so a worker's row of an unloaded adapter is never mistaken for a new one,
        and the KV cache salt differs."""
        int_id = self._next_id
        self._next_id += 1
        req = self.validator.check(PedroRequest(name, int_id, path), allowed_roots)  # req.path: a local folder
        lora = PedroLoRARequest(lora_name=name, lora_int_id=int_id, lora_path=req.path,
                                base_model_name=self._base_model_name(base_model_name), pedro_digest=req.digest)
        self.models.lora_requests[name] = lora
        logger.info("PEDRO adapter %r (id %d) served from %r", name, int_id, req.path)
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

    # -- tenants by name (--pedro-adapter-dir) ---------------------------------------------
    async def resolve(self, name: str):
        """None when `name` is now served from the adapter directory; an ErrorResponse (400)
        when its folder is there but not a servable adapter; "missing" when there is none."""
        problem = tenant_name_problem(name)
        if problem:
            return _error(f"The model name {name!r} is not a tenant name: it {problem}.", param="model")
        lock = self._resolving.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.models.lora_requests:
                return None
            root = self.args.adapter_dir
            try:
                path = adapter_dir_entry(root, name)
            except FileNotFoundError:
                return "missing"
            except AdapterError as e:
                return _error(f"PEDRO adapter '{name}': {e}", param="model")
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                return "missing"
            try:
                await asyncio.to_thread(self._add, name, path, None, [os.path.realpath(root)])
            except (AdapterError, OSError) as e:
                return _error(f"PEDRO adapter '{name}' in the adapter directory cannot be served: {e}", param="model")
            return None

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
                await asyncio.to_thread(self._add, name, real, None, self.allowed_roots)
            except (AdapterError, OSError, ValueError) as e:
                return _error(f"Cannot load PEDRO adapter '{name}' from '{path}': {e}", "InvalidUserInput",
                              param="pedro_path")
        return f"Success: PEDRO adapter '{name}' added successfully."

    async def unload(self, name: str | None):
        if not name:
            return _error("'pedro_name' needs to be provided to unload a PEDRO adapter.", "InvalidUserInput")
        async with self._lock:
            lora = self.models.lora_requests.get(name)
            if lora is not None and not is_pedro(lora):
                return _error(f"The name '{name}' is a loaded LoRA adapter's; unload it with /v1/unload_lora_adapter.",
                              "InvalidUserInput", param="pedro_name")
            if not is_pedro(lora):
                return _error(f"The PEDRO adapter '{name}' cannot be found.", "NotFoundError",
                              HTTPStatus.NOT_FOUND, param="pedro_name")
            # Requests already admitted keep their adapter (their sampling params name its
            # path, id and digest); new requests for this name get vLLM's 404.
            del self.models.lora_requests[name]
            self.validator.forget(lora.lora_int_id)
        logger.info("PEDRO adapter %r unloaded", name)
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

        def route(op: str, fields: str):
            async def handler(raw_request: Request):
                reg, data = getattr(raw_request.app.state, "pedro_registry", None), await body(raw_request)
                if reg is None:
                    return reply(_error("PEDRO is not enabled on this server (--enable-pedro)."))
                if data is None:
                    return reply(_error(f"Expected a JSON object {fields}."))
                if op == "load":
                    return reply(await reg.load(data.get("pedro_name"), data.get("pedro_path")))
                return reply(await reg.unload(data.get("pedro_name")))
            return handler

        app.add_api_route("/v1/load_pedro_adapter", route("load", '{"pedro_name": ..., "pedro_path": ...}'),
                          methods=["POST"])
        app.add_api_route("/v1/unload_pedro_adapter", route("unload", '{"pedro_name": ...}'), methods=["POST"])

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        global _registry
        if engine_client is None or not pedro_enabled(engine_client.vllm_config):
            return
        reg = PedroAdapterRegistry(state.openai_serving_models, engine_client.vllm_config,
                                   getattr(args, "pedro_allowed_roots", None))
        reg.add_static(reg.args.modules)
        state.pedro_registry = reg
        _registry = reg
        _watch_engine(engine_client)
        from .metrics import watch_engine

        watch_engine(reg.args.stats_path, engine_client.vllm_config.model_config.served_model_name)


# -- whether the server's engine died ---------------------------------------------------------
_served_engine = None


def _watch_engine(engine_client) -> None:
    global _served_engine
    _served_engine = engine_client


def engine_died() -> bool:
    """Whether this process's server engine died, as opposed to being shut down: one of its
    processes exited with a non-zero code while nobody was stopping it (vLLM's engine
    manager records it; a SIGTERM or SIGINT, even one sent to the whole process group,
    makes the engine exit with 0). vLLM's server then shuts down and its serve command
    returns normally; with PEDRO on, `vllm serve` and `vllm-pedro serve` exit with 1."""
    client = getattr(_served_engine, "engine_core", None)
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    return getattr(manager, "failed_proc_name", None) is not None
