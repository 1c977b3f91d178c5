#!/usr/bin/env python
"""Where PEDRO's prefill time goes on the CPU: the wall time of every engine step of one
batch (64 prompts x 256 tokens, 4 prefill steps of ~4,000 tokens, then decodes), for

  bare        stock vLLM
  pedro-base  the PEDRO engine, every request on the base model (the scaling runs, the
              generator does not): the cost of the wrapped layers alone
  pedro       the PEDRO engine, 16 tenants (generators at prefill)

each under glibc's default allocator and under a heap that keeps freed memory
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=16 GiB). Every (method, allocator) runs in its
own process, rounds interleaved; the JSON holds every step time.

Found with it (an earlier release): under the default allocator, buffers of 32 MiB and
more (the gate_up output of 4,096 prompt tokens is 48 MiB) are mmapped fresh and
page-faulted on first write, and torch.compile's buffer reuse (a peak-memory heuristic)
reused that buffer in every second layer of the bare graph but in none of PEDRO's, whose
traced q/k/v product was a second qkv-sized buffer per layer; each PEDRO prefill step paid
~15 more 48 MiB page-fault rounds. Now q/k/v are scaled in place on the CPU and the graph
allocates exactly as the bare one (benchmarks/graph_allocations.py). Both engines run
vLLM's default chunked prefill (steps of 4,096 tokens offline on the CPU).

    python benchmarks/prefill_steps.py --output-json benchmarks/results/prefill_steps_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def one_run(method: str, model: str, adapter_dir: str, eager: bool) -> dict:
    """In this process: one engine, a warm-up batch, then the step times of one batch."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its scheduler is reachable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    common = dict(dtype="float32", enforce_eager=eager, max_num_seqs=64, max_model_len=400, enable_prefix_caching=False)
    kw = {}
    if method == "bare":
        from vllm import LLM
        llm = LLM(model, **common)
    else:
        from vllm_pedro import LLM
        llm = LLM(model, enable_pedro=True, max_pedro_adapters=16, pedro_adapter_dir=adapter_dir, **common)
        if method == "pedro":
            kw = dict(pedro_request=[f"tenant-{i % 16}" for i in range(64)])
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    log, schedule = [], sched.schedule

    def timed_schedule(*a, **k):  # a step starts when it is scheduled; the next schedule call ends it
        out = schedule(*a, **k)
        log.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens), time.perf_counter()))
        return out

    sched.schedule = timed_schedule
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, 40000) for _ in range(256)]) for _ in range(64)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False, **kw)
    log.clear()
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False, **kw)
    steps = [dict(tokens=n, requests=r, ms=(log[i + 1][2] - t) * 1e3) for i, (n, r, t) in enumerate(log[:-1])]
    return dict(steps=steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="'' = the tiny random model; a vllm_pedro.tools.models name; "
                   "or a model directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--allocators", nargs="+", choices=("default", "heap"), default=["default", "heap"],
                   help="glibc's default, and/or a heap that keeps freed memory (MALLOC_MMAP_MAX_=0 ...)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--work-dir", default="/tmp/vllm-pedro-prefill-steps")
    p.add_argument("--output-json", default=None)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "ADAPTER_DIR"), help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    from vllm_pedro.tools.bench import make_pedro_adapters, resolve_model

    model, _ = resolve_model(args.model, args.work_dir)
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], model, args.one[1], args.enforce_eager)), flush=True)
        return 0

    adapter_dir = make_pedro_adapters(model, 16, 16, ("q", "v", "up"), os.path.join(args.work_dir, "pedro-r16"), 0)
    runs = {}
    for rnd in range(args.rounds):
        for alloc, extra in (("default", {}), ("heap kept", HEAP_ENV)):
            if alloc.split()[0] not in args.allocators:
                continue
            for method in ("bare", "pedro-base", "pedro"):
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
                cmd = [sys.executable, __file__, "--model", args.model, "--one", method, str(adapter_dir)]
                cmd += ["--enforce-eager"] if args.enforce_eager else []
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                res = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
                runs.setdefault(f"{alloc}|{method}", []).append(res["steps"])
                print(f"round {rnd + 1} {alloc:9s} {method:10s} prefill steps ms: "
                      f"{[round(s['ms']) for s in res['steps'] if s['tokens'] > 1000]}", flush=True)
    table = {}
    for key, rounds in runs.items():
        prefill = [s["ms"] for steps in rounds for s in steps if s["tokens"] > 1000]
        table[key] = statistics.median(prefill)
    print(f"\nmedian prefill step (~4,000 tokens), ms; ratio to bare under the same allocator")
    for alloc in ("default", "heap kept"):
        if f"{alloc}|bare" not in table:
            continue
        b = table[f"{alloc}|bare"]
        print(f"  {alloc:9s} " + "  ".join(f"{m} {table[f'{alloc}|{m}']:.0f} ({table[f'{alloc}|{m}'] / b:.3f})"
                                          for m in ("bare", "pedro-base", "pedro")))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(dict(
            benchmark="prefill_steps", command=" ".join(["python", *sys.argv]), heap_env=HEAP_ENV,
            median_prefill_step_ms=table, runs=runs, loadavg=os.getloadavg()), indent=1))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
