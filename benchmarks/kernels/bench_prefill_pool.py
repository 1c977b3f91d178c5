#!/usr/bin/env python
"""The prefill generator on a GPU: the old path (gather the prompts' hidden states,
generate_vectors, slot write) against prefill.write_vectors with the Triton pooler and
with the torch formulation, per prefill step (all layers), for SmolLM2-135M and
Llama-3-8B shapes, bf16, steps of 4096 prompt tokens (P prompts x N tokens, one base
token after each). Random weights; every written slot row checked against the old path
first (max |difference| recorded, failure if above 1 bf16 ulp of the values). Times:
wall ms per step with a device sync at the end (the prefill op runs eagerly between
compiled pieces, launch costs included), median (min-max) of --reps interleaved
passes; the Triton pooler alone is also given in GB/s of hidden states read.

    python benchmarks/kernels/bench_prefill_pool.py [--out DIR]
    python benchmarks/kernels/bench_prefill_pool.py --cpu   # CPU, tiny shapes, Triton interpreted: checks only (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if "--cpu" in sys.argv:  # Triton has no CPU backend: interpret it, set before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from vllm_pedro.generator import (GELU_DENOMINATOR, GELU_NUMERATOR, StackedGenerators,  # noqa: E402
                                  generate_vectors)
from vllm_pedro.ops import reference  # noqa: E402
from vllm_pedro.prefill import PrefillStep, write_vectors  # noqa: E402

MODELS = {"SmolLM2-135M": dict(layers=30, d=576, q=576, kv=192, ff=1536),
          "Llama-3-8B": dict(layers=32, d=4096, q=4096, kv=1024, ff=14336)}
STEPS = [(64, 64), (16, 256), (4, 1024)]


def make_case(m, prompts, length, rows, rank, dtype, dev, gen):
    d, width = m["d"], m["q"] + 2 * m["kv"] + m["ff"]
    layers = []
    for _ in range(m["layers"]):
        t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype).to(dev)  # noqa: E731
        layers.append(StackedGenerators(
            down_w=t(rows, rank, d, scale=d ** -0.5), down_b=t(rows, rank, scale=0.1),
            up_w=t(rows, width, rank, scale=0.05), up_b=t(rows, width, scale=0.01), pool_w=t(rows, d, scale=d ** -0.5),
            rat_num=torch.tensor(GELU_NUMERATOR).repeat(rows, 1).to(dtype).to(dev),
            rat_den=torch.tensor(GELU_DENOMINATOR).repeat(rows, 1).to(dtype).to(dev),
            pooler_code=torch.tensor([0, 2, 1, 0] * rows)[:rows].to(dev),  # attention, mean, last
            act_code=torch.zeros(rows, dtype=torch.long, device=dev),
            poolers=frozenset({"attention", "mean", "last"}), activations=frozenset({"rational"})))
    starts = np.arange(prompts) * (length + 1)
    row = np.arange(prompts) % rows
    slots = np.random.default_rng(0).permutation(prompts)
    step = PrefillStep.from_host(starts, np.full(prompts, length), row, slots, layers[0].poolers,
                                 layers[0].activations, dev)
    tok = torch.from_numpy(np.concatenate([np.arange(s, s + length) for s in starts])).to(dev)
    old = dict(tok=tok, seg=torch.arange(prompts, device=dev).repeat_interleave(length),
               row=torch.from_numpy(row).to(dev), slot=torch.from_numpy(slots).to(dev))
    x = (torch.randn(int(starts[-1]) + length + 1, d, generator=gen) * 2).to(dtype).to(dev)
    return layers, step, old, x, torch.ones(prompts + 1, width, dtype=dtype, device=dev)


def old_path(vectors, x, old, g):  # layers.pedro_prefill before prefill.write_vectors
    vec = generate_vectors(x[old["tok"]], old["seg"], old["row"], g)
    vectors.index_copy_(0, old["slot"], vec.to(vectors.dtype))


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for bench_prefill_pool.json")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--cpu", action="store_true", help="CPU, one tiny shape, Triton interpreted: checks only")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.cpu:
        dev, dtype, sync = "cpu", torch.float32, (lambda: None)
        models = {"tiny": dict(layers=2, d=40, q=40, kv=8, ff=64)}
        steps, pools = [(5, 7)], {"torch": reference.pool_prompts}
        if importlib.util.find_spec("triton") is not None:
            from vllm_pedro.ops import triton_kernels
            pools["triton"] = triton_kernels.pool_prompts
    else:
        from vllm_pedro.ops import triton_kernels
        dev, dtype, sync = "cuda", torch.bfloat16, torch.cuda.synchronize
        models, steps = MODELS, STEPS
        pools = {"triton": triton_kernels.pool_prompts, "torch": reference.pool_prompts}
    results = []

    def save():  # after every case: a step killed by its time limit keeps what it measured
        if args.out:
            info = dict(device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", dtype=str(dtype),
                        rows=args.rows, rank=args.rank, reps=args.reps, results=results)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_prefill_pool.json").write_text(json.dumps(info, indent=1))

    for model, m in models.items():
        for prompts, length in steps:
            layers, step, old, x, vectors = make_case(m, prompts, length, args.rows, args.rank, dtype, dev, gen)
            per_step = lambda f: (lambda: [f(g) for g in layers])  # noqa: E731
            variants = {"old": per_step(lambda g: old_path(vectors, x, old, g))}
            for name, pool in pools.items():
                variants[f"new, {name} pooler"] = per_step(lambda g, pool=pool: write_vectors(vectors, x, step, g, pool))
            # correctness: each new path's slot rows against the old path's, every element
            errs = {}
            for name, fn in variants.items():
                vectors.fill_(float("nan"))
                fn()
                if name == "old":
                    want = vectors[old["slot"]].float().clone()
                else:
                    got = vectors[old["slot"]].float()
                    errs[name] = float((got - want).abs().max())
                    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1.3e-6  # one bf16 ulp; float32: torch's default
                    if not bool(((got - want).abs() <= 1e-5 + rtol * want.abs()).all()):
                        print(f"FAIL {model} {prompts}x{length} {name}: max |diff| {errs[name]:.3g}")
                        return 1
            if args.cpu:
                results.append(dict(model=model, step=f"{prompts}x{length}", max_abs_diff=errs))
                continue
            samples = {name: [] for name in variants}
            for fn in variants.values():
                fn()  # warm-up: Triton compiles, allocator
            for _ in range(args.reps):
                for name, fn in variants.items():
                    samples[name].append(timed(fn, sync))
            pool_fn = pools["triton"]
            g = layers[0]
            out = torch.empty(prompts, m["d"], device=dev)
            pool_ms = statistics.median(timed(lambda: [pool_fn(x, step.starts, step.lengths, step.rows, g.pooler_code,
                                                               g.pool_w, step.num_tokens, out) for _ in range(20)], sync) / 20
                                        for _ in range(args.reps))
            gbs = prompts * length * m["d"] * x.element_size() / (pool_ms * 1e-3) / 1e9
            row = dict(model=model, step=f"{prompts}x{length}", max_abs_diff=errs, triton_pool_ms_per_layer=pool_ms,
                       triton_pool_gb_s=gbs,
                       ms_per_step={k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in samples.items()})
            results.append(row)
            save()
            print(f"{model} {prompts}x{length}: " + ", ".join(
                f"{k} {v['median']:.2f} ms ({v['min']:.2f}-{v['max']:.2f})" for k, v in row["ms_per_step"].items())
                + f"; Triton pooler {pool_ms * 1e3:.0f} us/layer = {gbs:.0f} GB/s; max |diff| {errs}")
    if args.cpu:
        print(f"all checks passed: {results}")
    save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
