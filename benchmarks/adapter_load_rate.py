#!/usr/bin/env python
"""How fast the host adapter store turns cold tenants into servable weights, and what bounds
it: for K adapters of an adapter folder (tenant-0 ...), each stage of a load on its own,
one thread, then the store's own loader threads end to end.

  read      the two files into memory (os.read; from the page cache when they are cached)
  digest    sha256 of the bytes (what the front end validated; hashlib releases the GIL)
  validate  config, safetensors header, names and shapes, tensors built, finite values
  stack     the per-layer tensors stacked and cast to the serving dtype (AdapterWeights.build)

`--drop-caches` first asks the kernel to drop the page cache (root only), so reads come from
the disk. Prints a table, saves JSON.

    python benchmarks/adapter_load_rate.py --adapter-dir DIR --model smollm2-135m --count 500 \\
        --output-json benchmarks/results/adapter_load_rate_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter-dir", required=True, help="a folder of tenant-<i> PEDRO adapters")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--count", type=int, default=200, help="adapters timed per measurement")
    ap.add_argument("--loader-threads", type=int, default=2)
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache first (needs root)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    import hashlib

    import torch
    from transformers import AutoConfig

    from vllm_pedro.adapter_io import parse_adapter, read_adapter_files
    from vllm_pedro.config import BaseShapes
    from vllm_pedro.tools.bench import save_json
    from vllm_pedro.tools.models import resolve_model
    from vllm_pedro.vllm.args import PedroArgs
    from vllm_pedro.vllm.request import PedroRequest
    from vllm_pedro.vllm.store import AdapterWeights, HostAdapterStore, State

    base = BaseShapes.from_hf_config(AutoConfig.from_pretrained(resolve_model(args.model)))
    names = sorted((n for n in os.listdir(args.adapter_dir) if n.startswith("tenant-")),
                   key=lambda n: int(n.split("-")[1]))
    if len(names) < 2 * args.count:
        raise SystemExit(f"need {2 * args.count} adapters in {args.adapter_dir}, found {len(names)}")

    def drop():
        if not args.drop_caches:
            return False
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError as e:
            print(f"[load-rate] cannot drop the page cache ({e}); reads come from wherever they are")
            return False

    dropped = drop()
    stages = {"read": [], "digest": [], "validate": [], "stack": []}
    nbytes = []
    for name in names[:args.count]:
        d = os.path.join(args.adapter_dir, name)
        t0 = time.perf_counter()
        files = read_adapter_files(d)
        t1 = time.perf_counter()
        h = hashlib.sha256()
        for part in (files.config_bytes, files.weights_bytes):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        digest = h.hexdigest()
        t2 = time.perf_counter()
        config, tensors = parse_adapter(files, base)
        t3 = time.perf_counter()
        AdapterWeights.build(config, digest, tensors, torch.float32, pin=False)
        t4 = time.perf_counter()
        for k, a, b in (("read", t0, t1), ("digest", t1, t2), ("validate", t2, t3), ("stack", t3, t4)):
            stages[k].append(b - a)
        nbytes.append(len(files.config_bytes) + len(files.weights_bytes))
    one = {k: statistics.median(v) * 1e3 for k, v in stages.items()}
    total_ms = sum(one.values())

    drop()
    serving = PedroArgs(max_rank=64, targets=("q", "k", "v", "up"))
    store = HostAdapterStore(base, serving, torch.float32, capacity=args.count + 1,
                             loader_threads=args.loader_threads)
    refs = []
    for i, name in enumerate(names[args.count:2 * args.count]):
        d = os.path.join(args.adapter_dir, name)
        refs.append(PedroRequest(name, i + 1, d, read_adapter_files(d).digest))
    drop()
    t0 = time.perf_counter()
    entries = [store.want(r) for r in refs]
    while any(e.state not in (State.READY, State.FAILED) for e in entries):
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    store.shutdown()
    failed = sum(e.state is State.FAILED for e in entries)
    rate = args.count / wall
    print(f"\nadapter loads ({statistics.median(nbytes) / 2**20:.2f} MiB each, {args.count} adapters, page cache "
          f"{'dropped' if dropped else 'as it was'})")
    print(f"{'stage':10} {'ms per adapter (median)':>24} {'share':>7}")
    for k, v in one.items():
        print(f"{k:10} {v:24.2f} {100 * v / total_ms:6.1f}%")
    print(f"one thread: {1e3 / total_ms:.0f} adapters/s; the store with {args.loader_threads} loader threads: "
          f"{rate:.0f} adapters/s ({failed} failed)")
    out = {"benchmark": "adapter_load_rate", "count": args.count, "bytes_median": statistics.median(nbytes),
           "page_cache_dropped": dropped, "stage_ms_median": one, "one_thread_per_s": 1e3 / total_ms,
           "store_per_s": rate, "loader_threads": args.loader_threads, "failed": failed,
           "stage_ms_all": {k: [x * 1e3 for x in v] for k, v in stages.items()},
           "command": " ".join(["python benchmarks/adapter_load_rate.py", *sys.argv[1:]]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
