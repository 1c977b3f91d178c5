"""`vllm-pedro demo`: one command that shows multi-tenant PEDRO serving end to end.

It builds a tiny random Llama and two demo adapters with distinct random weights,
starts `vllm-pedro serve` on 127.0.0.1, asks the same prompt of each tenant and of the
base model with the openai client, prints the completions and shuts the server down.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from .testing import DEMO_TENANTS, build_demo, free_port, server_env, start_server, stop_server, wait_ready


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
