#!/usr/bin/env python
"""The multi-turn cost of PEDRO, measured: conversations of --turns turns, each turn's
prompt the whole history (every earlier user message and answer) plus a new user
message, every conversation its own tenant.

  bare   the base model, vLLM's prefix caching on: turn t reads turn t-1's KV from the cache
  lora   vLLM multi-LoRA (one adapter per conversation), prefix caching on: the same reuse,
         per adapter
  pedro  PEDRO tenants: a PEDRO prompt's KV depends on the whole prompt (its vectors come
         from all of it), so it never reads cached KV and every turn re-prefills the history
         (SPEC.md, "Prefix caching")

One engine per method in its own process, alive for the run; each turn is sent as one batch
of every conversation's request and timed; the conversations (random token ids, the same for
every method) are replayed --passes times with the methods interleaved. Reported per turn:
prompt tokens, tokens read from the prefix cache, output tokens/s of the turn's batch, and
the median time to first token (vLLM's own timestamps).

    python benchmarks/multi_turn.py --model smollm2-135m \\
        --output-json benchmarks/results/multi_turn_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("bare", "lora", "pedro")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="'' = the tiny random model; smollm2-135m; a folder")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--conversations", type=int, default=16, help="conversations (= tenants), sent together")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-len", type=int, default=128, help="tokens of each new user message")
    ap.add_argument("--answer-len", type=int, default=64, help="tokens of each answer (ignore_eos)")
    ap.add_argument("--pedro-rank", type=int, default=10)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-space", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from vllm_pedro.tools.bench import (EngineProcess, _environment, make_lora_adapters, make_pedro_adapters,
                                        make_prompts, resolve_model, save_json)

    work = tempfile.mkdtemp(prefix="multi-turn-")
    model, label = resolve_model(args.model, work)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    c, T = args.conversations, args.turns
    max_len = T * (args.user_len + args.answer_len) + 16
    spec = dict(model=model, dtype="float32", seed=args.seed, enforce_eager=args.enforce_eager, max_num_seqs=c,
                max_model_len=max_len, kv_cache_space=args.kv_cache_space, num_tenants=c, pedro_rows=min(c, 16),
                pedro_rank=args.pedro_rank, pedro_targets=["q", "v", "up"], lora_rank=args.lora_rank,
                max_loras_cap=min(c, 16), prefix_caching=True, log_stats=True, pedro_old=None)
    if "pedro" in args.methods:
        spec["adapter_dir"] = make_pedro_adapters(model, c, args.pedro_rank, ["q", "v", "up"],
                                                  os.path.join(work, "pedro"), args.seed)
    if "lora" in args.methods:
        spec["lora_paths"] = make_lora_adapters(model, c, args.lora_rank, "qv", os.path.join(work, "lora"), args.seed)
    engines = {m: EngineProcess(dict(spec, method=m)) for m in args.methods}
    results = {m: [] for m in args.methods}
    try:
        for m, e in engines.items():  # warm-up: the shapes of every turn, other tokens
            history = make_prompts(vocab, c, args.user_len, args.seed + 10_000)
            for t in range(T):
                r = e.call("run_turn", prompts=history, tenants=list(range(c)), output_len=args.answer_len)
                history = [h + a + make_prompts(vocab, 1, args.user_len, args.seed + 20_000 + t)[0]
                           for h, a in zip(history, r["answers"])]
            print(f"[multi-turn] {m} warmed up", flush=True)
        for p in range(args.passes):
            order = args.methods[p % len(args.methods):] + args.methods[:p % len(args.methods)]
            for m in order:
                rng = random.Random(args.seed + p)
                users = [[[rng.randrange(10, vocab) for _ in range(args.user_len)] for _ in range(c)]
                         for _ in range(T)]
                history, turns = [u for u in users[0]], []
                for t in range(T):
                    r = engines[m].call("run_turn", prompts=history, tenants=list(range(c)),
                                        output_len=args.answer_len)
                    turns.append({"turn": t + 1, "prompt_tokens": r["prompt_tokens"],
                                  "cached_tokens": sum(r["cached_tokens"]), "wall_s": r["wall_s"],
                                  "out_tok_s": r["output_tokens"] / r["wall_s"],
                                  "ttft_p50_ms": 1e3 * statistics.median(r["ttft_s"]),
                                  "ttft_max_ms": 1e3 * max(r["ttft_s"])})
                    if t + 1 < T:
                        history = [h + a + u for h, a, u in zip(history, r["answers"], users[t + 1])]
                results[m].append({"pass": p, "turns": turns, "loadavg_after": os.getloadavg(),
                                   "wall_s": sum(x["wall_s"] for x in turns)})
            print(f"[multi-turn] pass {p + 1}/{args.passes}: " + "  ".join(
                f"{m} {results[m][-1]['wall_s']:.1f} s" for m in args.methods), flush=True)
    finally:
        for e in engines.values():
            e.stop()
    table = {}
    for m, ps in results.items():
        table[m] = []
        for t in range(T):
            rows = [p["turns"][t] for p in ps]
            table[m].append({k: statistics.median(r[k] for r in rows)
                             for k in ("prompt_tokens", "cached_tokens", "wall_s", "out_tok_s", "ttft_p50_ms")})
        table[m].append({"turn": "all", "wall_s": statistics.median(p["wall_s"] for p in ps),
                         "out_tok_s": c * T * args.answer_len / statistics.median(p["wall_s"] for p in ps)})
    print(f"\n{label}: {c} conversations x {T} turns (user {args.user_len} tokens, answer {args.answer_len}); "
          f"medians of {args.passes} passes")
    print(f"{'turn':>4} " + " ".join(f"{m + ' tok/s':>11} {m + ' TTFT ms':>13} {m + ' cached':>12}"
                                     for m in args.methods))
    for t in range(T):
        print(f"{t + 1:>4} " + " ".join(f"{table[m][t]['out_tok_s']:11.1f} {table[m][t]['ttft_p50_ms']:13.0f} "
                                        f"{table[m][t]['cached_tokens']:12.0f}" for m in args.methods))
    print(" all " + " ".join(f"{table[m][-1]['out_tok_s']:11.1f} {'':>13} {'':>12}" for m in args.methods))
    out = {"benchmark": "multi_turn", "model": label, "config": vars(args), "passes": results, "per_turn": table,
           "environment": _environment(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(["python benchmarks/multi_turn.py", *sys.argv[1:]])}
    save_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
