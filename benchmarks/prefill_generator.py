#!/usr/bin/env python
"""The vLLM prefill generator's cost per prefill step on the CPU, before and after each
change, at SmolLM2-135M's shapes (30 layers, d 576, q 576, kv 192, ff 1536; a slot row
[q | k | v | up] of 2496), with random weights and hidden states (no model download).

A step is a flat batch of --tokens tokens: PEDRO prompts of one length (--steps PxN: P
prompts of N tokens) with --gap base tokens (decodes) after each, the prompts spread
round-robin over --rows device adapter rows (--max-pedro-adapters), all with the default
kinds (attention pooler, rational activation; --mixed: every pooler and activation).
Each variant runs the generator of all 30 layers; interleaved rounds, median (min-max)
of ms per step.

  gather         x[token_idx]: the copy of the prompts' hidden states (old)  ->  none:
                 the prompts are spans of x, pooled where they lie
  pooling        scores, then segment_pool's small ops on the gathered copy (old)  ->
                 ops.pool_prompts: the torch formulation (sampled product + one sparse
                 [S, T] x [T, d] matmul) or the C++ CPU op (one pass per prompt)
  projections    per-prompt copies of the adapter rows (index_select of W_down, W_up) and
                 batched einsums (old)  ->  all R rows at once, then select each prompt's
                 row (measured, not shipped)  ->  one matmul per row present (shipped)
  whole          the old pedro_prefill body  ->  prefill.write_vectors with each pooler

The step's share: a torch forward of the same model shapes over the same flat batch
(RMSNorm, fused qkv, causal attention per prompt, o, gate_up, SiluAndMul, down; no vLLM,
no sampling, no paged KV writes: a lower bound of a vLLM prefill step, so the share is an
upper bound), timed in the same process, median of --step-rounds.

    python benchmarks/prefill_generator.py --output-json benchmarks/results/prefill_generator_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_pedro.generator import (ACTIVATION_CODES, GELU_DENOMINATOR, GELU_NUMERATOR, POOLER_CODES,  # noqa: E402
                                  StackedGenerators, activate, generate_vectors, segment_pool)
from vllm_pedro.ops import cpu as ops_cpu  # noqa: E402
from vllm_pedro.ops import reference  # noqa: E402
from vllm_pedro.prefill import PrefillStep, project, write_vectors  # noqa: E402

L, D, Q, KV, FF, HEAD = 30, 576, 576, 192, 1536, 64  # SmolLM2-135M
W = Q + 2 * KV + FF


# -- the code before the change (commit 7fdca44: layers.pedro_prefill, runner.PrefillStep) -------------
def old_prefill(vectors, x, old, g):
    vec = generate_vectors(x[old["token_idx"]], old["seg"], old["seg_row"], g)
    vectors.index_copy_(0, old["seg_slot"], vec.to(vectors.dtype))


def old_pool(h, old, g):  # generate_vectors up to the pooled states, on the gathered copy h
    h = h.float()
    seg_row, seg = old["seg_row"], old["seg"]
    scores = (h * g.pool_w.index_select(0, seg_row.index_select(0, seg)).float()).sum(-1)
    return segment_pool(h, seg, seg_row.shape[0], g.pooler_code.index_select(0, seg_row), scores)


def old_project(pooled, old, g):  # generate_vectors after pooling, and the slot write
    seg_row = old["seg_row"]
    rows = lambda t: t.index_select(0, seg_row).float()  # noqa: E731
    z = torch.einsum("sd,skd->sk", pooled, rows(g.down_w)) + rows(g.down_b)
    a = activate(z, g, seg_row)
    return 1.0 + torch.einsum("sk,swk->sw", a, rows(g.up_w)) + rows(g.up_b)


def all_rows_project(pooled, step, g):
    """The alternative to one matmul per row: every prompt against all R rows in one
    matmul each (views of the cache, no copies), then each prompt's own row selected."""
    S, R, r = pooled.shape[0], g.down_w.shape[0], g.down_w.shape[1]
    pick = torch.arange(S) * R + step.rows  # prompt s, row rows[s] in the [S * R, ...] results
    z = torch.addmm(g.down_b.reshape(-1), pooled, g.down_w.reshape(R * r, -1).T).view(S * R, r).index_select(0, pick)
    a = activate(z, g, step.rows)
    up = torch.addmm(g.up_b.reshape(-1), a, g.up_w.reshape(R * W, r).T).view(S * R, W)
    return up.index_select(0, pick).add_(1.0)


# -- inputs ------------------------------------------------------------------------------------------
def make_layers(rows: int, rank: int, mixed: bool, gen) -> list[StackedGenerators]:
    kinds = [("attention", "rational")] * rows
    if mixed:
        kinds = [(["attention", "last", "mean"][i % 3], ["rational", "gelu", "relu", "silu"][i % 4]) for i in range(rows)]
    out = []
    for _ in range(L):
        out.append(StackedGenerators(
            down_w=torch.randn(rows, rank, D, generator=gen) / D ** 0.5, down_b=torch.randn(rows, rank, generator=gen) * 0.1,
            up_w=torch.randn(rows, W, rank, generator=gen) * 0.05, up_b=torch.randn(rows, W, generator=gen) * 0.01,
            pool_w=torch.randn(rows, D, generator=gen) / D ** 0.5,
            rat_num=torch.tensor(GELU_NUMERATOR).repeat(rows, 1), rat_den=torch.tensor(GELU_DENOMINATOR).repeat(rows, 1),
            pooler_code=torch.tensor([POOLER_CODES[p] for p, _ in kinds]),
            act_code=torch.tensor([ACTIVATION_CODES[a] for _, a in kinds]),
            poolers=frozenset(p for p, _ in kinds), activations=frozenset(a for _, a in kinds)))
    return out


def make_step(prompts: int, length: int, gap: int, rows: int, g: StackedGenerators):
    starts = np.arange(prompts) * (length + gap)
    lengths = np.full(prompts, length)
    row = np.arange(prompts) % rows
    slots = np.random.default_rng(0).permutation(prompts)
    step = PrefillStep.from_host(starts, lengths, row, slots, g.poolers, g.activations, "cpu")
    tok = np.concatenate([np.arange(s, s + length) for s in starts])  # the old step: per-token arrays
    old = dict(token_idx=torch.from_numpy(tok), seg=torch.from_numpy(np.repeat(np.arange(prompts), length)),
               seg_row=torch.from_numpy(row), seg_slot=torch.from_numpy(slots))
    return step, old, int(starts[-1] + length + gap)


# -- the step estimate: a plain torch forward of the same shapes ---------------------------------------
def make_model(gen):
    lin = lambda o, i: torch.randn(o, i, generator=gen) / i ** 0.5  # noqa: E731
    return [dict(qkv=lin(Q + 2 * KV, D), o=lin(D, Q), gu=lin(2 * FF, D), dn=lin(D, FF), n1=torch.ones(D), n2=torch.ones(D))
            for _ in range(L)]


def forward(model, h, prompt_rows: torch.Tensor, prompts: int, length: int):
    """The flat batch through 30 layers; attention causal within each prompt (the base
    tokens go through every matmul; their attention, over a short KV, is left out)."""
    grid = lambda t, n: t.view(prompts, length, n // HEAD, HEAD).transpose(1, 2)  # noqa: E731  [P, heads, N, 64]
    for w in model:
        qkv = F.linear(F.rms_norm(h, (D,), w["n1"]), w["qkv"]).index_select(0, prompt_rows)
        q, k, v = qkv.split([Q, KV, KV], 1)
        a = F.scaled_dot_product_attention(grid(q, Q), grid(k, KV), grid(v, KV), is_causal=True, enable_gqa=True)
        attn = h.new_zeros(h.shape[0], Q).index_copy_(0, prompt_rows, a.transpose(1, 2).reshape(-1, Q))
        h = h + F.linear(attn, w["o"])
        gate, up = F.linear(F.rms_norm(h, (D,), w["n2"]), w["gu"]).chunk(2, 1)
        h = h + F.linear(F.silu(gate) * up, w["dn"])
    return h


# -- timing ----------------------------------------------------------------------------------------------
def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3  # ms per call


def measure(variants: dict, rounds: int, reps: int) -> dict:
    got = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            got[name].append(timed(fn, reps))
    return {name: dict(median=statistics.median(v), min=min(v), max=max(v), samples=v) for name, v in got.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", default=["64x64", "16x256"], help="PxN: P prompts of N tokens per step")
    p.add_argument("--gap", type=int, default=1, help="base tokens after each prompt (decodes of other requests)")
    p.add_argument("--rows", type=int, default=4, help="device adapter rows (--max-pedro-adapters; vLLM's default 4)")
    p.add_argument("--rank", type=int, default=16, help="the cache's rank columns (--max-pedro-rank)")
    p.add_argument("--mixed", action="store_true", help="every pooler and activation across the rows")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3, help="steps per timing")
    p.add_argument("--step-rounds", type=int, default=3, help="timings of the torch forward (the step estimate)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = make_layers(args.rows, args.rank, args.mixed, gen)
    t0 = time.perf_counter()
    cpu_ok, cpu_why = ops_cpu.load()
    cpu_load_s = time.perf_counter() - t0
    print(f"C++ CPU op: {cpu_why} ({cpu_load_s:.1f} s)")
    pools = {"torch": reference.pool_prompts}
    if cpu_ok:
        pools["cpu"] = ops_cpu.pool_prompts
    model = make_model(gen)
    results = []
    for spec in args.steps:
        prompts, length = map(int, spec.split("x"))
        step, old, total = make_step(prompts, length, args.gap, args.rows, layers[0])
        x = torch.randn(total, D, generator=gen)
        vectors = torch.ones(prompts + 1, W)
        pooled = torch.randn(prompts, D, generator=gen)

        def per_step(fn):
            return lambda: [fn(g) for g in layers]

        def new_pool(pool):
            return lambda g: pool(x, step.starts, step.lengths, step.rows, g.pooler_code, g.pool_w, step.num_tokens,
                                  torch.empty(prompts, D))

        variants = {
            "gather: old": per_step(lambda g: x[old["token_idx"]]),
            "pooling: old (gather + segment_pool)": per_step(lambda g: old_pool(x[old["token_idx"]], old, g)),
            **{f"pooling: {name}": per_step(new_pool(pool)) for name, pool in pools.items()},
            "projections: old (row copies)": per_step(lambda g: vectors.index_copy_(0, old["seg_slot"], old_project(pooled, old, g))),
            "projections: all rows + select": per_step(lambda g: vectors.index_copy_(0, step.slots, all_rows_project(pooled, step, g))),
            "projections: per row (shipped)": per_step(lambda g: vectors.index_copy_(0, step.slots, project(pooled, step, g))),
            "whole: old": per_step(lambda g: old_prefill(vectors, x, old, g)),
            **{f"whole: new, {name} pooling": per_step(lambda g, pool=pool: write_vectors(vectors, x, step, g, pool))
               for name, pool in pools.items()},
        }
        res = measure(variants, args.rounds, args.reps)
        with torch.no_grad():
            h = torch.randn(total, D, generator=gen)
            fwd = measure({"forward": lambda: forward(model, h, old["token_idx"], prompts, length)},
                          args.step_rounds, 1)["forward"]
        share = {name: r["median"] / fwd["median"] for name, r in res.items() if name.startswith("whole")}
        results.append(dict(step=spec, tokens=total, prompt_tokens=prompts * length, ms_per_step=res,
                            forward_ms=fwd, share_of_forward=share))
        print(f"\n{spec}: {prompts} prompts x {length} tokens + {args.gap} base token(s) after each = {total} tokens; "
              f"{args.rows} rows, rank {args.rank}; ms per step ({L} layers), median (min-max) of {args.rounds} rounds")
        print(f"{'variant':40s} {'ms/step':>24s}")
        for name, r in res.items():
            print(f"{name:40s} {r['median']:9.2f} ({r['min']:.2f}-{r['max']:.2f})")
        print(f"{'torch forward of the step (estimate)':40s} {fwd['median']:9.1f} ({fwd['min']:.1f}-{fwd['max']:.1f})")
        for name, s in share.items():
            print(f"  share of the step, {name}: {100 * s:.2f}%")
    out = dict(benchmark="prefill_generator", command=" ".join(["python", *sys.argv]), threads=torch.get_num_threads(),
               loadavg=os.getloadavg(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
               cpu_op=dict(available=cpu_ok, why=cpu_why, load_s=cpu_load_s),
               shapes=dict(layers=L, d=D, q=Q, kv=KV, ff=FF, slot_width=W, rows=args.rows, rank=args.rank, mixed=args.mixed,
                           gap=args.gap),
               results=results)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
