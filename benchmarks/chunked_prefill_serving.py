#!/usr/bin/env python
"""What chunked prefill buys PEDRO tenants: decode latency while long base prompts keep
arriving.

Traffic, the same for every server: --decoders closed-loop clients, each a PEDRO tenant
(round robin over --num-tenants) sending a short prompt (--short-len tokens) and streaming
--output-len tokens, then the next request; meanwhile long base-model prompts
(--long-len tokens, --long-output-len tokens out) arrive as a Poisson process of
--long-rate per second. Per request the client records the time to first token and every
inter-token latency from the SSE stream (vLLM's OpenAI server, `/v1/completions`, token-id
prompts, ignore_eos).

Servers, alive together, passes interleaved (the order rotates):
  pedro-chunked   PEDRO, chunked prefill on with a step of --step-tokens (the default now)
  pedro-unchunked PEDRO, chunked prefill off (the behaviour before: every prompt in one step)
  bare-chunked    the bare model, chunked prefill on, the same step; its "tenants" are base
                  requests of the same shapes
Reported: decode ITL p50/p99 and TTFT p50/p99 of the tenants' requests, TTFT of the long
base prompts, tokens per second; medians over passes; ratios chunked/unchunked and
PEDRO/bare.

    python benchmarks/chunked_prefill_serving.py --model smollm2-135m \\
        --output-json benchmarks/results/chunked_prefill_serving_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = ("pedro-chunked", "pedro-unchunked", "bare-chunked")


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def server_flags(kind: str, args, tenants: dict[str, str]) -> list[str]:
    max_len = args.long_len + args.long_output_len + 16
    flags = ["--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", str(args.max_num_seqs),
             "--no-enable-prefix-caching"]
    if kind.endswith("-chunked"):
        flags += ["--enable-chunked-prefill", "--max-num-batched-tokens", str(args.step_tokens)]
    else:
        flags += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_len)]
    if kind.startswith("pedro"):
        flags += ["--enable-pedro", "--pedro-modules", *[f"{n}={p}" for n, p in tenants.items()],
                  "--max-pedro-adapters", str(min(len(tenants), 8)), "--max-pedro-rank", str(args.rank)]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


async def stream_one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{model}: no tokens streamed")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps),
            "e2e": stamps[-1] - t0}


async def one_pass(port: int, tenant_models: list[str], base_model: str, args, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/v1/completions"
    vocab_lo, vocab_hi = 10, args.vocab - 1
    short = lambda: [rng.randrange(vocab_lo, vocab_hi) for _ in range(args.short_len)]  # noqa: E731
    long_ = lambda: [rng.randrange(vocab_lo, vocab_hi) for _ in range(args.long_len)]  # noqa: E731
    tenant_results, long_results = [], []
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.decoders + 64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def decoder(i: int):
            k = 0
            while time.perf_counter() < deadline:
                model = tenant_models[(i + k) % len(tenant_models)]
                tenant_results.append(await stream_one(client, url, model, short(), args.output_len))
                k += 1

        async def long_arrivals():
            tasks = []
            while time.perf_counter() < deadline:
                await asyncio.sleep(rng.expovariate(args.long_rate))
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(stream_one(client, url, base_model, long_(), args.long_output_len)))
            for t in tasks:
                long_results.append(await t)

        t0 = time.perf_counter()
        await asyncio.gather(*(decoder(i) for i in range(args.decoders)), long_arrivals())
        wall = time.perf_counter() - t0
    itl = [x for r in tenant_results for x in r["itl"]]
    out_tokens = len(tenant_results) * args.output_len + len(long_results) * args.long_output_len  # ignore_eos
    return {"tenant_requests": len(tenant_results), "long_requests": len(long_results), "wall_s": wall,
            "output_tok_s": out_tokens / wall,
            "tenant_itl_p50_ms": 1e3 * pct(itl, 50), "tenant_itl_p99_ms": 1e3 * pct(itl, 99),
            "tenant_ttft_p50_ms": 1e3 * pct([r["ttft"] for r in tenant_results], 50),
            "tenant_ttft_p99_ms": 1e3 * pct([r["ttft"] for r in tenant_results], 99),
            "long_ttft_p50_ms": 1e3 * pct([r["ttft"] for r in long_results], 50) if long_results else None,
            "long_ttft_p99_ms": 1e3 * pct([r["ttft"] for r in long_results], 99) if long_results else None,
            "loadavg_after": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="'' = the tiny random model; smollm2-135m; a folder")
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--num-tenants", type=int, default=8)
    ap.add_argument("--decoders", type=int, default=8, help="closed-loop tenant clients")
    ap.add_argument("--short-len", type=int, default=64, help="tenant prompt tokens")
    ap.add_argument("--output-len", type=int, default=64, help="tenant output tokens")
    ap.add_argument("--long-len", type=int, default=1024, help="long base prompt tokens")
    ap.add_argument("--long-output-len", type=int, default=8)
    ap.add_argument("--long-rate", type=float, default=0.25, help="long base prompts per second (Poisson)")
    ap.add_argument("--step-tokens", type=int, default=256, help="--max-num-batched-tokens with chunked prefill")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60, help="seconds per pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-space", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from transformers import AutoConfig

    from vllm_pedro.testing import build_random_adapters, free_port, server_env, stop_server, wait_ready
    from vllm_pedro.tools.bench import resolve_model, save_json

    work = tempfile.mkdtemp(prefix="chunked-serving-")
    model, label = resolve_model(args.model, work)
    args.vocab = AutoConfig.from_pretrained(model).vocab_size
    names = [f"tenant-{i}" for i in range(args.num_tenants)]
    tenants = dict(zip(names, build_random_adapters(model, {i: os.path.join(work, n) for i, n in enumerate(names)},
                                                    std=0.05, rational_std=0.01, r=args.rank)))
    import subprocess

    servers, logs = {}, {}
    try:
        for kind in args.servers:
            port = free_port()
            logs[kind] = open(os.path.join(work, f"{kind}.log"), "w")
            cmd = [sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
                   "--served-model-name", "base", *server_flags(kind, args, tenants)]
            servers[kind] = (subprocess.Popen(cmd, env=server_env(VLLM_CPU_KVCACHE_SPACE=args.kv_cache_space),
                                              stdout=logs[kind], stderr=subprocess.STDOUT, start_new_session=True), port)
        for kind, (proc, port) in servers.items():
            wait_ready(proc, port, timeout=900)
            tms = names if kind.startswith("pedro") else ["base"]
            warm = argparse.Namespace(**{**vars(args), "duration": 5.0})
            asyncio.run(one_pass(port, tms, "base", warm, args.seed + 99))
            print(f"[chunked] {kind} ready and warmed up", flush=True)
        runs = {k: [] for k in args.servers}
        for p in range(args.passes):
            order = args.servers[p % len(args.servers):] + args.servers[:p % len(args.servers)]
            for kind in order:
                _, port = servers[kind]
                tms = names if kind.startswith("pedro") else ["base"]
                runs[kind].append(asyncio.run(one_pass(port, tms, "base", args, args.seed + p)) | {"pass": p})
            print(f"[chunked] pass {p + 1}/{args.passes}: " + "  ".join(
                f"{k} ITL p99 {runs[k][-1]['tenant_itl_p99_ms']:.0f} ms" for k in args.servers), flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
        for f in logs.values():
            f.close()
    keys = [k for k in runs[args.servers[0]][0] if k.endswith(("_ms", "_tok_s"))]
    med = {kind: {k: statistics.median(r[k] for r in rs if r[k] is not None) for k in keys
                  if any(r[k] is not None for r in rs)} for kind, rs in runs.items()}
    ratios = {}
    if {"pedro-chunked", "pedro-unchunked"} <= set(med):
        for k in ("tenant_itl_p50_ms", "tenant_itl_p99_ms", "tenant_ttft_p50_ms", "long_ttft_p50_ms"):
            if k in med["pedro-chunked"] and k in med["pedro-unchunked"]:
                ratios[f"chunked_vs_unchunked_{k}"] = med["pedro-chunked"][k] / med["pedro-unchunked"][k]
    if {"pedro-chunked", "bare-chunked"} <= set(med):
        for k in ("tenant_itl_p50_ms", "tenant_itl_p99_ms", "tenant_ttft_p50_ms", "output_tok_s"):
            ratios[f"pedro_vs_bare_{k}"] = med["pedro-chunked"][k] / med["bare-chunked"][k]
    print(f"\n{label}: {args.decoders} tenant clients ({args.short_len} in / {args.output_len} out) + base prompts of "
          f"{args.long_len} tokens at {args.long_rate}/s; chunked step {args.step_tokens} tokens; medians of "
          f"{args.passes} passes of {args.duration:.0f} s")
    print(f"{'server':16} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'long TTFT p50':>13} "
          f"{'tok/s':>7}")
    for kind, r in med.items():
        print(f"{kind:16} {r['tenant_itl_p50_ms']:8.1f} {r['tenant_itl_p99_ms']:8.1f} {r['tenant_ttft_p50_ms']:9.1f} "
              f"{r['tenant_ttft_p99_ms']:9.1f} {r.get('long_ttft_p50_ms', float('nan')):13.1f} "
              f"{r['output_tok_s']:7.1f}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    out = {"benchmark": "chunked_prefill_serving", "model": label, "config": vars(args), "passes": runs,
           "medians": med, "ratios": ratios, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(["python benchmarks/chunked_prefill_serving.py", *sys.argv[1:]]),
           "environment": {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}}
    save_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
