"""`vllm-pedro ray-serve`: `vllm-pedro serve` on N Ray Serve replicas, one endpoint.

It takes every `vllm serve` flag and the PEDRO flags (vLLM's own parser, as `vllm-pedro
serve`), plus a Ray Serve group: a fixed --num-replicas or autoscaling between
--min-replicas and --max-replicas, the cluster to join (--ray-address), per-replica
resources. The vLLM flags that differ from their defaults become the replicas'
`engine_kwargs`; --host/--port become Serve's HTTP proxy. The application is
serve.py's `build_app`; --print-config prints it as a `serve run` / `serve deploy`
config file instead of starting it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import sys
import threading

DESCRIPTION = """\
Serve PEDRO tenants from N replicas of the vLLM engine on Ray Serve, behind one
OpenAI-compatible endpoint (Serve's HTTP proxy). Every replica serves every tenant
(--pedro-modules, --pedro-adapter-dir): "model": NAME selects a tenant on whichever
replica Serve's router picks; an unknown name is a 404. Each response names the replica
that produced it in the x-pedro-replica header. `--help="Ray Serve"` lists the Ray
options, `--help=PEDRO` the PEDRO ones.

Without --ray-address a local Ray cluster is started (and stopped on exit); with
--ray-address auto the running cluster is joined and the application stays deployed
after exit with --detach. On GPUs each replica is placed with tensor-parallel-size GPUs
and, with tensor parallelism, runs vLLM's Ray executor (workers as Ray actors).

examples:
  vllm-pedro ray-serve ./Qwen2.5-0.5B --enable-pedro --pedro-modules a=adapters/a b=adapters/b \\
      --num-replicas 4
  vllm-pedro ray-serve ./Qwen2.5-0.5B --enable-pedro --pedro-adapter-dir /shared/adapters \\
      --min-replicas 1 --max-replicas 8 --target-ongoing-requests 32 --ray-address auto --detach
  vllm-pedro ray-serve ./Qwen2.5-0.5B --enable-pedro --pedro-adapter-dir /shared/adapters \\
      --num-replicas 2 --print-config > pedro-serve.yaml     # then: serve run pedro-serve.yaml
"""

# vLLM flags that configure the HTTP server process, which Serve's proxy replaces.
NOT_ENGINE_KWARGS = {"model", "model_tag", "served_model_name", "host", "port", "uds", "uvicorn_log_level",
                     "disable_uvicorn_access_log", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
                     "enable_ssl_refresh", "ssl_cert_reqs", "ssl_ciphers", "root_path", "api_server_count",
                     "headless", "grpc", "config"}


def make_ray_serve_parser():
    from ..vllm.server import make_serve_parser

    parser = make_serve_parser()
    parser.prog = "vllm-pedro ray-serve"
    parser.description = DESCRIPTION
    parser.usage = "vllm-pedro ray-serve MODEL [options]"
    g = parser.add_argument_group("Ray Serve", "Replicas, autoscaling and placement on a Ray cluster (vllm-pedro).")
    g.add_argument("--num-replicas", type=int, default=None,
                   help="A fixed number of replicas, each a vLLM engine serving every tenant (default: 1, or "
                        "autoscaling when --min-replicas/--max-replicas are given).")
    g.add_argument("--min-replicas", type=int, default=None, help="Autoscaling: the fewest replicas (default 1).")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="Autoscaling: the most replicas (needed to autoscale).")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="Autoscaling: the requests in flight per replica Serve scales to (default 16).")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="Requests in flight one replica accepts before Serve queues them (default: "
                        "unbounded, Ray Serve LLM's default; the engine queues them).")
    g.add_argument("--ray-address", default=None,
                   help="The Ray cluster to join ('auto': the one this node belongs to). Default: start a local "
                        "one for this command's lifetime.")
    g.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto",
                   help="Where the engines run: auto picks gpu when the cluster has GPUs.")
    g.add_argument("--accelerator-type", default=None, help="Ray accelerator type of the GPUs (e.g. H100).")
    g.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs reserved for each replica's server process (Ray Serve LLM's default: 1).")
    g.add_argument("--engine-cpus", type=float, default=None,
                   help="CPU engines only: CPUs reserved for each engine worker (Ray Serve LLM's default: 1).")
    g.add_argument("--replica-env", nargs="+", default=None, metavar="NAME=VALUE",
                   help="Environment variables of the replicas and their engines (e.g. VLLM_CPU_KVCACHE_SPACE=4). "
                        "A local cluster started here inherits this shell's environment; a joined one does not.")
    g.add_argument("--app-name", default="pedro", help="The Serve application's name.")
    g.add_argument("--detach", action="store_true",
                   help="Deploy and exit, leaving the application running (needs --ray-address).")
    g.add_argument("--print-config", action="store_true",
                   help="Print the application as a Serve config file (YAML for `serve run` / `serve deploy`) "
                        "and exit.")
    return parser


def add_ray_serve_arguments(p: argparse.ArgumentParser) -> None:
    """All arguments go to vLLM's parser plus the Ray group, built only when `ray-serve`
    is the chosen subcommand."""
    from ..cli import delegate_parsing

    delegate_parsing(p, make_ray_serve_parser)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """vLLM engine/frontend arguments given on the command line (those that differ from
    the parser's defaults), PEDRO's and Ray's flags left out."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    defaults = make_ray_serve_parser().parse_args([args.model])
    names = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | {f.name for f in dataclasses.fields(FrontendArgs)}
    out = {}
    for name in sorted(names - NOT_ENGINE_KWARGS):
        if hasattr(args, name) and getattr(args, name) != getattr(defaults, name, None):
            out[name] = getattr(args, name)
    return out


def serve_config(args: argparse.Namespace) -> dict:
    """The `build_app` arguments for these flags."""
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    if getattr(args, "pedro_allowed_roots", None):
        raise ValueError("--pedro-allowed-roots: runtime adapter loading would reach one replica; serve tenants "
                         "with --pedro-adapter-dir, which every replica resolves by name")
    if args.detach and not args.ray_address:
        raise ValueError("--detach needs --ray-address (a local cluster stops when this command exits)")
    engine_kwargs = _engine_kwargs(args)
    config: dict = {"model": _absolute(args.model), "engine_kwargs": engine_kwargs, "accelerator": args.accelerator}
    if args.served_model_name:
        config["model_id"] = args.served_model_name[0]
    if args.enable_pedro:
        from ..vllm.args import apply_cli_args

        pargs = apply_cli_args(copy.copy(args), device="cpu")  # checks the flags; the device is resolved per worker
        pedro = pargs.to_dict()
        for m in pedro["modules"]:
            m["path"] = _absolute(m["path"])
        pedro["adapter_dir"] = pedro["adapter_dir"] and _absolute(pedro["adapter_dir"])
        config["pedro"] = pedro
    else:
        config["enable_pedro"] = False
    deployment: dict = {}
    if args.min_replicas is not None or args.max_replicas is not None or args.target_ongoing_requests is not None:
        if args.num_replicas is not None:
            raise ValueError("--num-replicas is a fixed count; autoscaling takes --min-replicas/--max-replicas")
        if args.max_replicas is None:
            raise ValueError("autoscaling needs --max-replicas")
        auto = {"min_replicas": args.min_replicas if args.min_replicas is not None else 1,
                "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing_requests or 16}
        deployment["autoscaling_config"] = auto
    else:
        deployment["num_replicas"] = args.num_replicas or 1
    if args.max_ongoing_requests is not None:
        deployment["max_ongoing_requests"] = args.max_ongoing_requests
    if args.replica_cpus is not None:
        deployment["ray_actor_options"] = {"num_cpus": args.replica_cpus}
    config["deployment_config"] = deployment
    if args.accelerator_type:
        config["accelerator_type"] = args.accelerator_type
    if args.engine_cpus is not None:
        if args.accelerator == "gpu":
            raise ValueError("--engine-cpus sizes CPU engines; GPU engines get Ray Serve LLM's GPU bundles")
        tp = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
        config["placement_group_config"] = {"bundles": [{"CPU": args.engine_cpus}] * tp}
    if args.replica_env:
        config["env_vars"] = dict(_name_value(e) for e in args.replica_env)
    return config


def _absolute(path: str) -> str:
    """A local path as an absolute one (replicas do not share this shell's directory);
    anything else (a hub id) unchanged."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--replica-env {text!r}: expected NAME=VALUE")
    return name, value


def _http(args) -> dict:
    return {"host": args.host or "0.0.0.0", "port": args.port}


def _bounded(fn, timeout: float) -> None:
    """fn() in a daemon thread, given up after `timeout` seconds (a cluster whose
    processes got the terminal's Ctrl-C too may no longer answer)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)


def run_ray_serve(args: argparse.Namespace) -> int:
    config = serve_config(args)
    if args.print_config:
        import yaml

        doc = {"http_options": _http(args),
               "applications": [{"name": args.app_name, "route_prefix": "/",
                                 "import_path": "vllm_pedro.ray.serve:build_app", "args": config}]}
        print(yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False), end="")
        return 0

    import ray
    from ray import serve

    from .serve import build_app

    own_cluster = not args.ray_address
    ray.init(address=args.ray_address or "local", include_dashboard=False if own_cluster else None)
    try:
        serve.start(http_options=_http(args))
        serve.run(build_app(config), name=args.app_name, route_prefix="/", blocking=False)
        http = _http(args)
        print(f"vllm-pedro ray-serve: application {args.app_name!r} is serving on "
              f"http://{http['host']}:{http['port']}/v1", flush=True)
        if args.detach:
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("vllm-pedro ray-serve: shutting down", file=sys.stderr, flush=True)
        # A cluster started here goes away with ray.shutdown(); a joined one keeps running.
        _bounded(serve.shutdown if own_cluster else (lambda: serve.delete(args.app_name)), 60)
        return 0
    finally:
        if not args.detach:
            ray.shutdown()
