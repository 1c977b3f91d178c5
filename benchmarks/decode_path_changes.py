#!/usr/bin/env python
"""Each change to PEDRO's decode path, measured on its own, on the CPU: the code before and
after each change side by side in one process, at SmolLM2-135M's shapes, per decode step
(all layers), interleaved repeats, median (min-max).

  scaling op     q/v scaling: gather + torch.where mask + multiply per range (base tokens
                 at slot -1)  ->  one gather-multiply over the whole fused qkv output (a
                 slot row is [q | k | v | up]; base tokens read a row of ones)
  up scaling     a separate scale of the up half, then the model's SiluAndMul  ->  the
                 scaling fused into the activation, silu(gate) * (up * l_u) (the cost
                 shown is what each adds over the bare model's SiluAndMul)
  custom ops     every layer's scaling through torch.ops.vllm.* (the dispatcher) in eager
                 mode  ->  plain Python calls
  backend        the ops backend re-resolved (environment read) on every call  ->  once
  step map       a Python walk over every running request every step  ->  StepMap (an
                 unchanged decode step does nothing; a changed one rebuilds with array ops)

    python benchmarks/decode_path_changes.py --output-json benchmarks/results/decode_path_changes_cpu.json
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
from vllm_pedro import ops  # noqa: E402
from vllm_pedro.ops import reference  # noqa: E402
from vllm_pedro.vllm.runner import StepMap  # noqa: E402
from vllm_pedro.vllm.slots import SlotPool  # noqa: E402

L, Q, KV, FF = 30, 576, 192, 1536  # SmolLM2-135M
W = Q + 2 * KV + FF  # a slot row: [q | k | v | up]


# -- the code before the changes (commit 7508802, vllm_pedro/ops/reference.py and runner.py) ----------
def old_scale_range(x, vectors, slot_idx, col):
    T, D = x.shape
    s = slot_idx[:T].long()
    mask = (s >= 0).unsqueeze(1)
    v = vectors[:, col:col + D].index_select(0, s.clamp(min=0)).float()
    v = torch.where(mask, v, 1.0)
    x.mul_(v)


def old_scale_qkv(qkv, vectors, slot_idx):
    old_scale_range(qkv[:, :Q], vectors, slot_idx, 0)
    old_scale_range(qkv[:, Q + KV:], vectors, slot_idx, Q)


class OldRequestState:
    def __init__(self, pedro, prompt_len):
        class P:
            pass
        self.sampling_params = P()
        self.sampling_params.extra_args = {"pedro": {"name": "t", "int_id": 1, "path": "/x"}} if pedro else {}
        self.num_prompt_tokens = prompt_len


def old_step_walk(req_ids, requests, computed, num_sched, owner, token_slot_np, token_slot):
    starts = np.concatenate([[0], np.cumsum(num_sched)])
    token_slot_np.fill(-1)
    for i, req_id in enumerate(req_ids):
        state = requests[req_id]
        info = (state.sampling_params.extra_args or {}).get("pedro")
        if info is None:
            continue
        if int(computed[i]) == 0:
            continue
        slot = owner.get(req_id)
        token_slot_np[starts[i]:starts[i] + int(num_sched[i])] = slot
    token_slot.copy_(torch.from_numpy(token_slot_np))


# -- timing ---------------------------------------------------------------------------------------
def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6  # microseconds per call


def measure(pairs: dict, rounds: int, reps: int) -> dict:
    """pairs: name -> (old fn, new fn). Interleaved rounds; medians (min-max) of us per call."""
    got = {name: {"old": [], "new": []} for name in pairs}
    for _ in range(rounds):
        for name, (old, new) in pairs.items():
            got[name]["old"].append(timed(old, reps))
            got[name]["new"].append(timed(new, reps))
    return {name: {k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in d.items()}
            for name, d in got.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="decode tokens (requests) per step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in args.batch:
        S = T
        vec_old = (1 + 0.1 * torch.randn(S, W, generator=gen))
        vec_new = torch.cat([vec_old, torch.ones(1, W)])  # + the ones row
        base = torch.rand(T, generator=gen) < 0.25  # a quarter of the batch are base requests
        slot_old = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
        slot_new = slot_old.clone()
        slot_old[base], slot_new[base] = -1, S
        qkv = torch.randn(T, Q + 2 * KV, generator=gen)
        gu = torch.randn(T, 2 * FF, generator=gen)
        backend = ops.backend("cpu")

        def per_step(fn):
            return lambda: [fn() for _ in range(L)]

        # custom-op dispatch: the same body registered as a torch custom op vs called directly
        lib = torch.library.Library("pedro_bench", "FRAGMENT")
        lib.define("scale(Tensor(a!) qkv, Tensor vectors, Tensor slot_idx) -> ()")
        lib.impl("scale", lambda x, v, s: reference.scale_(x, v, s, 0), "CPU")
        op = torch.ops.pedro_bench.scale

        pairs = {
            "scaling op (q, v)": (per_step(lambda: old_scale_qkv(qkv, vec_old, slot_old)),
                                  per_step(lambda: backend.scale_(qkv, vec_new, slot_new, 0))),
            "up scaling (added over SiluAndMul)": (
                per_step(lambda: (old_scale_range(gu[:, FF:], vec_old, slot_old, Q + KV), F.silu(gu[:, :FF]) * gu[:, FF:])),
                per_step(lambda: reference.silu_and_mul_scaled(gu, vec_new, slot_new, Q + 2 * KV))),
            "custom-op dispatch (eager)": (per_step(lambda: op(qkv, vec_new, slot_new)),
                                           per_step(lambda: backend.scale_(qkv, vec_new, slot_new, 0))),
            "backend resolution": (per_step(lambda: (ops.backend("cpu"), ops.backend("cpu"))), per_step(lambda: None)),
        }
        native = measure({"SiluAndMul": (per_step(lambda: F.silu(gu[:, :FF]) * gu[:, FF:]),
                                         per_step(lambda: None))}, args.rounds, args.reps)["SiluAndMul"]["old"]
        res = measure(pairs, args.rounds, args.reps)
        key = "up scaling (added over SiluAndMul)"
        for k in ("old", "new"):
            res[key][k] = {s: v - native["median"] for s, v in res[key][k].items()}

        # the step map: a decode step whose batch did not change, and one where a request left
        slots = SlotPool(1, T, 1, torch.float32, torch.device("cpu"))
        ids = [f"r{i}" for i in range(T)]
        for i, r in enumerate(ids):
            if not base[i]:
                slots.acquire(r)
        requests = {r: OldRequestState(not base[i], 64) for i, r in enumerate(ids)}
        index = {r: i for i, r in enumerate(ids)}
        ones = np.ones(T, dtype=np.int32)
        computed = np.full(T, 100)
        tok_np, tok = np.full(8192, -1, dtype=np.int32), torch.full((8192,), -1, dtype=torch.int32)
        smap = StepMap(slots, 8192, T, "cpu")
        smap.prepare(ids, index, ones, None)
        changed = [ids[1:], ids]

        def new_changed():
            smap.prepare(changed[0], index, ones[:len(changed[0])], None)
            changed.reverse()

        res.update(measure({
            "step map, unchanged decode step": (lambda: old_step_walk(ids, requests, computed, ones, slots.owner, tok_np, tok),
                                                lambda: smap.prepare(ids, index, ones, None)),
            "step map, a request left": (lambda: old_step_walk(ids, requests, computed, ones, slots.owner, tok_np, tok),
                                         new_changed)}, args.rounds, args.reps * 10))
        row = dict(batch=T, silu_and_mul_us=native["median"], us_per_step=res)
        rows.append(row)
        print(f"\nbatch {T} (us per decode step, {L} layers; median (min-max) of {args.rounds} rounds)")
        print(f"{'change':38s} {'before':>22s} {'after':>22s}")
        for name, d in res.items():
            f = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"  # noqa: E731
            print(f"{name:38s} {f(d['old']):>22s} {f(d['new']):>22s}")
    out = dict(benchmark="decode_path_changes", command=" ".join(["python", *sys.argv]), threads=torch.get_num_threads(),
               loadavg=os.getloadavg(), shapes=dict(layers=L, q=Q, kv=KV, ff=FF), rows=rows)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
