#!/usr/bin/env python
"""CUDA-graph capture of PEDRO's decode scaling inside a torch decode loop (no vLLM).

A stack of L decoder-shaped layers (fused qkv projection, gate/up projection, down
projection; SmolLM2-135M's widths by default) runs one decode step for B requests. The
PEDRO step adds, per layer, the one gather-multiply on the fused qkv output and the up
scaling fused into the activation (vllm_pedro.ops, the backend resolved once), reading
static buffers: the slot table [L, S + 1, W] (last row: ones, for base requests) and the
token -> slot map. Both steps are captured in CUDA graphs; between replays the map and some
slot rows change in place (requests join and leave, prefills write vectors), and every
replay is checked against the same step run eagerly. Reported: graph-replay time per step
of bare vs PEDRO (median of --iters replays, GPU-timed), and the checks.

    python benchmarks/kernels/cuda_graph_decode.py --out benchmarks/results/gpu/cuda_graph_decode.json
    python benchmarks/kernels/cuda_graph_decode.py --cpu      # no GPU: eager only, a smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from vllm_pedro import ops  # noqa: E402


class Stack:
    def __init__(self, L, d, q, kv, ff, B, S, dtype, device, gen):
        w = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(dtype).to(device)  # noqa: E731
        self.L, self.q, self.kv, self.ff = L, q, kv, ff
        self.wqkv = [w(q + 2 * kv, d) for _ in range(L)]
        self.wgu = [w(2 * ff, d) for _ in range(L)]
        self.wdown = [w(d, ff) for _ in range(L)]
        self.wo = [w(d, q) for _ in range(L)]
        self.x = torch.randn(B, d, generator=gen).to(dtype).to(device)  # static input
        self.out = torch.empty_like(self.x)
        width = q + kv + ff  # slot row [q | v | up]
        self.vectors = (1 + 0.1 * torch.randn(L, S + 1, width, generator=gen)).to(dtype).to(device)
        self.vectors[:, S] = 1  # the ones row
        self.slot = torch.full((B,), S, dtype=torch.int32, device=device)
        self.backend = ops.backend(device)

    def step(self, pedro: bool):
        h = self.x
        for li in range(self.L):
            qkv = F.linear(h, self.wqkv[li])
            if pedro:
                self.backend.scale_qkv_(qkv, self.vectors[li], self.slot, self.q, self.kv, 0, -1, self.q)
            attn = F.linear(qkv[:, :self.q], self.wo[li])  # stands in for attention + o_proj
            gu = F.linear(h + attn, self.wgu[li])
            if pedro:
                act = torch.empty(gu.shape[0], self.ff, dtype=gu.dtype, device=gu.device)
                self.backend.silu_and_mul_scaled(gu, self.vectors[li], self.slot, self.q + self.kv, act)
            else:
                act = F.silu(gu[:, :self.ff]) * gu[:, self.ff:]
            h = h + F.linear(act, self.wdown[li])
        self.out.copy_(h)


def gpu_time(fn, iters):
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--q", type=int, default=576)
    p.add_argument("--kv", type=int, default=192)
    p.add_argument("--ff", type=int, default=1536)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--cpu", action="store_true", help="no GPU: eager steps only, checks only")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --cpu for the smoke check)")
    dtype = getattr(torch, args.dtype if not args.cpu else "float32")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B in (args.batch if not args.cpu else [4]):
        S = B
        s = Stack(args.layers if not args.cpu else 2, args.hidden, args.q, args.kv, args.ff, B, S, dtype, device, gen)
        row = dict(batch=B, backend=s.backend.name, dtype=str(dtype))
        checks = []
        graphs = {}
        if not args.cpu:
            for name in ("bare", "pedro"):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        s.step(name == "pedro")  # warm up (Triton JIT) outside capture
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    s.step(name == "pedro")
                graphs[name] = g
        for trial in range(5):
            # Requests join and leave: a new token -> slot map (some base), fresh vectors in some rows.
            new_slot = torch.randint(0, S + 1, (B,), generator=gen, dtype=torch.int32)
            s.slot.copy_(new_slot.to(device))
            rows_changed = torch.randint(0, S, (max(1, S // 4),), generator=gen)
            s.vectors[:, rows_changed.to(device)] = (1 + 0.1 * torch.randn(s.L, len(rows_changed), s.vectors.shape[-1],
                                                                          generator=gen)).to(dtype).to(device)
            s.x.copy_(torch.randn(s.x.shape, generator=gen).to(dtype).to(device))
            if graphs:
                graphs["pedro"].replay()
                got = s.out.clone()
            s.step(True)
            want = s.out.clone()
            if not graphs:
                got = want
            checks.append(bool(torch.equal(got, want)))
            base_rows = new_slot == S  # a base request: the PEDRO step equals the bare step
            s.step(False)
            bare = s.out.clone()
            checks.append(bool(torch.equal(want[base_rows.to(device)], bare[base_rows.to(device)])))
        row["checks_passed"], row["checks"] = sum(checks), len(checks)
        if graphs:
            row["bare_graph_ms"] = gpu_time(graphs["bare"].replay, args.iters)
            row["pedro_graph_ms"] = gpu_time(graphs["pedro"].replay, args.iters)
            row["pedro_vs_bare"] = row["pedro_graph_ms"] / row["bare_graph_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(device=torch.cuda.get_device_name(0) if not args.cpu else "cpu", torch=torch.__version__,
                  config=vars(args), rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    ok = all(r["checks_passed"] == r["checks"] for r in rows)
    print("cuda_graph_decode:", "all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
