"""`vllm-pedro demo`: one command that shows multi-tenant PEDRO serving end to end.

It builds a tiny random Llama and two demo adapters with distinct random weights,
starts `vllm-pedro serve` on 127.0.0.1, asks the same prompt of each tenant and of the
base model with the openai client, prints the completions and shuts the server down.

Also here: the cheap CLI hooks of `vllm-pedro serve` and `vllm-pedro demo` (nothing
imports vLLM until one of them runs), and helpers the serving tests share."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

DEMO_TENANTS = {"tenant-a": 1, "tenant-b": 2}  # name -> seed
SERVER_FLAGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8"]


# -- building blocks (also used by tests/test_serving.py) ------------------------------
def make_demo_adapter(model_dir: str, out_dir: str, seed: int, r: int = 8, std: float = 0.5) -> str:
    """A PEDRO adapter for `model_dir` with random non-zero generator weights (an
    untrained adapter would leave the model unchanged); kept if `out_dir` has one."""
    from .tiny import build_random_adapter

    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    return build_random_adapter(model_dir, out_dir, seed=seed, std=std, rational_std=0.0, r=r)


def build_demo(workdir: str) -> tuple[str, dict[str, str]]:
    """The tiny model and the demo adapters under `workdir` (idempotent)."""
    from .tiny import build_tiny_model

    model = build_tiny_model(os.path.join(workdir, "tiny-llama"), arch="llama", seed=0)
    adapters = {name: make_demo_adapter(model, os.path.join(workdir, "adapters", name), seed)
                for name, seed in DEMO_TENANTS.items()}
    return model, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_server(model: str, adapters: dict[str, str], port: int, extra_args=(), env=None,
                 log_file=None) -> subprocess.Popen:
    """`vllm-pedro serve` (as `python -m vllm_pedro.cli serve`, which works without the
    console script on PATH) in its own process group; stop it with stop_server."""
    cmd = [sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           *SERVER_FLAGS, "--enable-pedro", "--pedro-modules", *[f"{n}={p}" for n, p in adapters.items()],
           *extra_args]
    return subprocess.Popen(cmd, env=env or server_env(), stdout=log_file or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 240.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready after {timeout:.0f} s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """SIGTERM the server; True when its whole process group (engine included) exited in
    time. Whatever is left after the timeout is killed."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    clean = False
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not group_alive(pgid):
            clean = True
            break
        time.sleep(0.2)
    if not clean and group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)
    return clean


# -- the demo ------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None,
                   help="where the tiny model and the demo adapters are written (reused when present); "
                        "default: a temporary directory, removed afterwards")
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1; 0 picks a free one")
    p.add_argument("--prompt", default="The quick brown fox", help="the prompt every tenant gets")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (greedy)")
    p.add_argument("--server-log", default=None, help="write the server's log to this file")


def run_demo(args: argparse.Namespace) -> int:
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vllm-pedro-demo-")
        workdir = tmp.name
    t0 = time.monotonic()
    try:
        print(f"[demo] building the tiny model and {len(DEMO_TENANTS)} adapters in {workdir}", flush=True)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, adapters = build_demo(workdir)
        base = "tiny-llama"
        port = args.port or free_port()
        log = open(args.server_log, "w") if args.server_log else None
        env = server_env()
        print(f"[demo] starting vllm-pedro serve on 127.0.0.1:{port}", flush=True)
        proc = start_server(model, adapters, port, extra_args=["--served-model-name", base], env=env, log_file=log)
        try:
            wait_ready(proc, port)
            print(f"[demo] server ready after {time.monotonic() - t0:.1f} s", flush=True)
            from openai import OpenAI

            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            print("[demo] /v1/models:", ", ".join(
                f"{m.id}" + (f" (parent {m.parent})" if getattr(m, "parent", None) else "")
                for m in client.models.list().data))
            outs = {}
            for name in [base, *adapters]:
                r = client.completions.create(model=name, prompt=args.prompt, max_tokens=args.max_tokens,
                                              temperature=0)
                outs[name] = r.choices[0].text
                print(f"[demo] model={r.model!r:>12}: {args.prompt!r} -> {r.choices[0].text!r}")
            distinct = len(set(outs.values()))
            print(f"[demo] {distinct} distinct completions from {len(outs)} models")
        finally:
            clean = stop_server(proc)
            if log:
                log.close()
        print(f"[demo] server stopped ({'cleanly' if clean else 'killed'}); {time.monotonic() - t0:.1f} s in all")
        return 0 if clean else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


# -- the `serve` subcommand hook ------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's options need vLLM's FlexibleArgumentParser (JSON and dotted options, config
    files, --help=<group>) and importing vLLM, so this subcommand's parser hands all its
    arguments to that parser, only when `serve` is the chosen subcommand."""

    def parse_known_args(arg_strings=None, namespace=None):
        from .vllm.cli_serve import make_serve_parser

        ns = namespace if namespace is not None else argparse.Namespace()
        ns._run = p.get_default("_run")
        return make_serve_parser().parse_args(list(arg_strings or []), ns), []

    p.parse_known_args = parse_known_args


def run_serve(args: argparse.Namespace) -> int:
    from .vllm.cli_serve import serve

    return serve(args)


SERVE_HELP = "serve a model with PEDRO adapters: vLLM's OpenAI-compatible server (every vllm serve option)"


def cli_commands(command_cls) -> dict:
    """The entries vllm_pedro/cli.py adds to its COMMANDS table."""
    return {
        "serve": command_cls(SERVE_HELP, add_serve_arguments, run_serve,
                             SERVE_HELP + ". Run `vllm-pedro serve --help` for the options."),
        "demo": command_cls("start a server with a tiny model and two demo tenants, query each, shut down",
                            add_demo_arguments, run_demo, __doc__.split("\n\n")[1]),
    }


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace(workdir=None, port=0, prompt="The quick brown fox", max_tokens=16,
                                         server_log=None)))
