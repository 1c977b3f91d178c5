#!/usr/bin/env python
"""What --enable-pedro adds to a server's start: seconds from launch until /health answers,
`vllm-pedro serve MODEL` vs `vllm-pedro serve MODEL --enable-pedro --pedro-modules ...`,
the same model and mode, starts interleaved (bare, PEDRO, bare, ...), --runs of each;
medians and ranges. PEDRO's server log is kept to read where its extra time goes (the
early adapter check before the engine starts, the store and device rows, the wrapped layers'
compilation).

    python benchmarks/startup_time.py --model smollm2-135m --runs 3 \\
        --output-json benchmarks/results/startup_time_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="'' = the tiny random model; smollm2-135m; a folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tenants", type=int, default=3, help="--pedro-modules of the PEDRO server")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from vllm_pedro.testing import build_random_adapters, free_port, server_env, stop_server, wait_ready
    from vllm_pedro.tools.bench import resolve_model, save_json

    work = tempfile.mkdtemp(prefix="startup-")
    model, label = resolve_model(args.model, work)
    names = [f"tenant-{i}" for i in range(args.tenants)]
    paths = build_random_adapters(model, {i: os.path.join(work, n) for i, n in enumerate(names)}, r=8)
    flags = ["--dtype", "float32", "--max-model-len", "512", *(["--enforce-eager"] if args.enforce_eager else [])]
    kinds = {"bare": [], "pedro": ["--enable-pedro", "--pedro-modules", *[f"{n}={p}" for n, p in zip(names, paths)]]}
    times = {k: [] for k in kinds}
    for r in range(args.runs):
        for kind, extra in kinds.items():
            port = free_port()
            log_path = os.path.join(work, f"{kind}-{r}.log")
            with open(log_path, "w") as log:
                t0 = time.perf_counter()
                proc = subprocess.Popen([sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1",
                                         "--port", str(port), *flags, *extra],
                                        env=server_env(VLLM_CPU_KVCACHE_SPACE=2), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    wait_ready(proc, port, timeout=900)
                    times[kind].append(time.perf_counter() - t0)
                finally:
                    stop_server(proc)
            print(f"[startup] run {r + 1}/{args.runs} {kind}: {times[kind][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{label}, {'eager' if args.enforce_eager else 'compiled'}: seconds to /health, medians of {args.runs}")
    for k, v in times.items():
        print(f"  {k:6} {med[k]:6.1f} s  (range {min(v):.1f}-{max(v):.1f})")
    print(f"  PEDRO adds {med['pedro'] - med['bare']:+.1f} s ({med['pedro'] / med['bare']:.3f}x)")
    out = {"benchmark": "startup_time", "model": label, "config": vars(args), "seconds": times, "medians": med,
           "pedro_minus_bare_s": med["pedro"] - med["bare"], "last_pedro_log": open(log_path).read()[-20000:],
           "command": " ".join(["python benchmarks/startup_time.py", *sys.argv[1:]]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
