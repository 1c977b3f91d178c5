"""`vllm-pedro serve`: vLLM's own `vllm serve` with the PEDRO flags.

The parser is vLLM's (`make_arg_parser` on a FlexibleArgumentParser: every `vllm serve`
option, config files, `--help=<group>`) plus the PEDRO group; the server is vLLM's serve
command. What makes it PEDRO is what --enable-pedro switches on in any vLLM server, `vllm
serve` included: the PEDRO scheduler and worker (args.py) and, in the API server, the
tenant registry and endpoints (serving.py) with the wraps of patches.py. Two additions
here: the model's family and the --pedro-modules are checked against the model's config
before the engine starts (a minute on a small CPU machine), so they fail fast; and a server whose
engine died exits with code 1 (vLLM's serve command returns normally then).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .args import PedroArgs, add_cli_args, apply_cli_args

DESCRIPTION = """\
Serve a model with vLLM's OpenAI-compatible API and PEDRO adapters. A request selects
an adapter with "model": "<adapter name>" (completions, chat completions, streaming);
"model": "<base model>" runs the base model, in the same batches. /v1/models lists the
adapters with the base model as parent. `vllm serve MODEL --enable-pedro ...` is the same
server.

With --pedro-adapter-dir DIR, "model": NAME serves DIR/NAME (tenants resolved by name).
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


def make_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-pedro serve", description=DESCRIPTION,
                                    usage="vllm-pedro serve MODEL [options]")
    parser = make_arg_parser(parser)
    add_cli_args(parser)  # a no-op where the general plugin added them already
    return parser


def check_modules_early(args: argparse.Namespace, pargs: PedroArgs) -> None:
    """Check the model's family (families.py) and the --pedro-modules against the model's
    config before the engine starts. The engine and the server check them again."""
    from ..config import AdapterError
    from ..families import early_hf_config
    from .offline import AdapterValidator
    from .request import PedroRequest

    hf_config = early_hf_config(args.model, getattr(args, "revision", None),
                                bool(getattr(args, "trust_remote_code", False)))
    if hf_config is None:
        return
    validator = AdapterValidator(hf_config, pargs)  # refuses an unsupported family or served target
    for i, m in enumerate(pargs.modules, 1):
        try:
            validator.check(PedroRequest(m.name, i, m.path))
        except (AdapterError, OSError) as e:
            raise ValueError(f"--pedro-modules {m.name}={m.path}: {e}") from e


def serve(args: argparse.Namespace) -> int:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from . import patches

    cli_env_setup()
    pargs = apply_cli_args(args)
    if pargs is not None:
        check_modules_early(args, pargs)
        patches.enable_pedro()
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)  # with PEDRO on, a dead engine raises SystemExit(1) (patches "serve_exit_code")
    from .serving import engine_died

    return 1 if pargs is not None and engine_died() else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vllm_pedro.vllm.server MODEL ...` (the same as `vllm-pedro serve`)."""
    parser = make_serve_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return serve(args)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
