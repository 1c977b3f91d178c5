"""PEDRO tenants on Ray Serve: N replicas, one OpenAI-compatible endpoint.

A PEDRO adapter is a few MB, read only at prefill, so every replica serves every tenant
and a request may go to any replica: no adapter affinity, no multiplexing. Each replica
is Ray Serve LLM's `LLMServer` (the vLLM engine with `engine_kwargs`, here PEDRO's)
deployed as the application's HTTP ingress: Serve's proxy hands each request to a
replica chosen by the deployment's request router, and the replica answers with vLLM's
own OpenAI app, the one `vllm-pedro serve` runs. So `"model": NAME` selects a tenant,
an unknown name is vLLM's 404, /v1/models lists the tenants, and --pedro-adapter-dir
tenants resolve by name on whichever replica gets the request.

Why not Ray Serve LLM's default `OpenAiIngress` in front: it routes by base-model id and
takes adapters only as multiplexed "base:adapter" ids (a 404 for "model": NAME), and it
sends each adapter to the few replicas that loaded it, which PEDRO does not need.

`PedroLLMServer` adds to `LLMServer` only what a PEDRO server process needs: the
front-end wraps of `vllm_pedro.vllm.patches` (switched on by --enable-pedro in
`vllm-pedro serve`; a Serve replica parses no flags) and an `x-pedro-replica` response
header naming the replica that answered. Runtime adapter loading (/v1/load_pedro_adapter)
is not offered: it would reach one replica; put tenants under --pedro-adapter-dir instead.

`build_app(args)` is a Serve application builder, for `serve run` and config files:

    serve run vllm_pedro.ray.serve:build_app model=/models/base pedro_adapter_dir=/adapters

`vllm-pedro ray-serve` (cli.py) builds the same `args` from `vllm serve` flags.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

REPLICA_HEADER = "x-pedro-replica"
DEPLOYMENT_PREFIX = "PedroLLMServer:"
ACCELERATORS = ("auto", "cpu", "gpu")


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


class PedroLLMServer(LLMServer):
    """Ray Serve LLM's LLMServer for an engine with PEDRO enabled (engine_kwargs)."""

    async def start(self):
        from ..vllm import patches

        patches.enable_pedro()  # before the engine client and its OpenAI state exist
        await super().start()

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()  # vLLM's app; PEDRO's tenant registry inside
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001  (outside Serve, e.g. in a unit test)
            replica = f"pid-{os.getpid()}"
        app.middleware_stack = None  # vLLM's build_app built it; let Starlette rebuild it
        app.add_middleware(_ReplicaHeader, replica=replica)
        return app


def _accelerator(choice: str) -> str:
    if choice not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {choice!r}")
    if choice != "auto":
        return choice
    import ray

    if ray.is_initialized():
        return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def llm_config(args: dict) -> LLMConfig:
    """The LLMConfig of a PEDRO deployment. `args` (all optional but `model`):

    model            the base model: a local folder (on every node) or a hub id
    model_id         the "model" name of base-model requests (default: `model`)
    pedro            PedroArgs fields, or their flag names at the top level of `args`:
                     pedro_modules (["name=path", ...] or {name: path}), pedro_adapter_dir,
                     max_pedro_adapters, max_cpu_pedro_adapters, max_pedro_rank, pedro_targets
    enable_pedro     false: serve the plain model (default true)
    engine_kwargs    vLLM engine and frontend arguments (dtype, max_model_len,
                     tensor_parallel_size, ...)
    deployment_config  Ray Serve options: num_replicas or autoscaling_config,
                     max_ongoing_requests, ray_actor_options, request_router_config, ...
    accelerator      auto (GPU if the cluster has GPUs), cpu or gpu
    accelerator_type a Ray accelerator type (e.g. H100) for GPU deployments
    placement_group_config  Ray Serve LLM's per-replica bundles (e.g. {"bundles": [{"CPU": 2}]})
    runtime_env      the replicas' Ray runtime_env
    env_vars         {NAME: value}: environment variables of the replicas and their engines

    `serve run vllm_pedro.ray.serve:build_app key=value ...` passes strings: pedro_modules
    "a=/x b=/y", max_pedro_adapters "8" are understood; dicts need a config file.
    """
    from .engine import pedro_args, pedro_engine_kwargs

    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("PEDRO Ray Serve config: 'model' (the base model) is required")
    pedro_keys = {"pedro_modules", "pedro_adapter_dir", "max_pedro_adapters", "max_cpu_pedro_adapters",
                  "max_pedro_rank", "pedro_targets"}
    pedro = {**(args.pop("pedro", None) or {}), **{k: args.pop(k) for k in list(args) if k in pedro_keys}}
    enable = str(args.pop("enable_pedro", True)).lower() not in ("false", "0", "no")
    if args.get("pedro_allowed_roots"):
        raise ValueError("runtime PEDRO adapter loading (pedro_allowed_roots) would reach one replica; serve "
                         "tenants from pedro_adapter_dir (resolved by name on every replica) instead")
    args.pop("pedro_allowed_roots", None)
    engine_kwargs = dict(args.pop("engine_kwargs", None) or {})
    if enable:
        engine_kwargs = pedro_engine_kwargs(engine_kwargs, pedro_args(pedro))
    elif pedro:
        raise ValueError(f"{sorted(pedro)} need enable_pedro")
    accelerator = _accelerator(args.pop("accelerator", "auto"))
    runtime_env = dict(args.pop("runtime_env", None) or {})
    env_vars = {**(runtime_env.get("env_vars") or {}), **{k: str(v) for k, v in (args.pop("env_vars", None) or {}).items()}}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    config = dict(
        model_loading_config={"model_id": args.pop("model_id", None) or model, "model_source": model},
        engine_kwargs=engine_kwargs,
        deployment_config=dict(args.pop("deployment_config", None) or {}),
        runtime_env=runtime_env or None,
    )
    if accelerator == "cpu":
        config["accelerator_config"] = {"kind": "cpu"}
    if args.get("accelerator_type"):
        config["accelerator_type"] = args.pop("accelerator_type")
    args.pop("accelerator_type", None)
    if args.get("placement_group_config"):
        pg = config["placement_group_config"] = args.pop("placement_group_config")
        bundles = pg.get("bundles") or ([pg["bundle_per_worker"]] if pg.get("bundle_per_worker") else [])
        if accelerator == "gpu" and not any(b.get("GPU") for b in bundles):
            raise ValueError(f"placement_group_config {pg} has no GPU for a GPU deployment")
    args.pop("placement_group_config", None)
    if args:
        raise ValueError(f"unknown PEDRO Ray Serve option(s) {sorted(args)}")
    return LLMConfig(**config)


def build_app(args: dict):
    """The Serve application: one PEDRO LLMServer deployment as the HTTP ingress (a Ray
    Serve application builder: `serve run vllm_pedro.ray.serve:build_app key=value ...`)."""
    config = args if isinstance(args, LLMConfig) else llm_config(args)
    return build_llm_deployment(config, name_prefix=DEPLOYMENT_PREFIX,
                                deployment_cls=serve.ingress()(PedroLLMServer))
