#!/usr/bin/env python
"""PEDRO gather-scale kernels on a GPU: correctness, bandwidth, and cost vs LoRA.

For each model shape, dtype (fp16, bf16), batch of T decode tokens and backend (triton,
cuda): fresh random data, outputs poisoned with NaN, every element checked against the
torch reference; then timed. Times are GPU times of CUDA-graph replays of 20 back-to-back
calls (how vLLM decodes), median of 30 replays, so Python launch overhead is excluded.
Achieved GB/s (logical bytes: activations read + written, one vector row per token) is
set against a device-to-device copy of the same bytes, timed the same way in the same run.

PEDRO's cost for targets q, v, up is scale_qkv_ (q, v) plus what silu_and_mul_scaled adds
over the plain SiluAndMul it replaces (same kernel with col = -1). The LoRA baseline is a
rank-8/16 shrink+expand for the same targets, as batched gather-matmul in torch ops
(per-token A/B gathered by adapter index, torch.bmm), T tokens from 1..64 tenants.
(vLLM's punica/SGMV kernels would beat this naive baseline; it shows the order of cost.)

    python benchmarks/kernels/bench_gather_scale.py [--out DIR] [--backends triton cuda]
    python benchmarks/kernels/bench_gather_scale.py --smoke   # CPU, torch backend, checks only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
try:
    from vllm_pedro import ops
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))
    from vllm_pedro import ops
from vllm_pedro.ops import reference

MODELS = {
    "SmolLM2-135M": dict(d=576, q=576, kv=192, ff=1536),
    "Llama-2-7B": dict(d=4096, q=4096, kv=4096, ff=11008),
    "Llama-3-8B": dict(d=4096, q=4096, kv=1024, ff=14336),
}
TOKENS = [1, 4, 16, 64, 256]
TENANTS = [1, 8, 64]
RANKS = [8, 16]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---- timing ----

def time_us(fn, inner=20, reps=30) -> float:
    """Median GPU microseconds per call: CUDA graph of `inner` calls, replayed `reps` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton JIT, allocator) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(times)


_copy_cache: dict = {}


def copy_us(nbytes: int, device) -> float:
    """A device-to-device copy moving nbytes in all (nbytes/2 read + nbytes/2 written)."""
    if nbytes in _copy_cache:
        return _copy_cache[nbytes]
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    _copy_cache[nbytes] = time_us(lambda: dst.copy_(src))
    return _copy_cache[nbytes]


# ---- one (model, dtype, T): data and the PEDRO ops ----

class Case:
    def __init__(self, shape, dtype, T, device, gen, base_frac=0.0):
        q, kv, ff = shape["q"], shape["kv"], shape["ff"]
        self.q, self.kv, self.ff, self.T, self.dtype, self.device = q, kv, ff, T, dtype, device
        W = q + kv + ff  # per-slot vector layout [q | v | up]
        self.q_col, self.v_col, self.up_col = 0, q, q + kv
        self.es = torch.finfo(dtype).bits // 8
        # One slot per decoding request; a bigger buffer so rows are strided like a real pool.
        # The last row is all ones: base-model tokens point at it (as in the PEDRO runtime).
        big = 1 + 0.01 * torch.randn(T + 3, 2, W, generator=gen)
        big[T + 2] = 1
        self.vectors = big.to(dtype).to(device)[:, 0, :]
        slots = torch.randperm(T + 2, generator=gen)[:T]
        slots[torch.rand(T, generator=gen) < base_frac] = T + 2
        self.slots = torch.cat([slots, torch.full((8,), T + 2)]).to(torch.int32).to(device)
        self.qkv = torch.randn(T, q + 2 * kv, generator=gen).to(dtype).to(device)
        self.up = torch.randn(T, ff, generator=gen).to(dtype).to(device)
        self.gate_up = torch.randn(T, 2 * ff, generator=gen).to(dtype).to(device)
        self.out = torch.empty(T, ff, dtype=dtype, device=device)

    def run(self, op):
        if op == "scale_qkv_":
            ops.scale_qkv_(self.qkv, self.vectors, self.slots, self.q, self.kv,
                           self.q_col, -1, self.v_col)
        elif op == "scale_":
            ops.scale_(self.up, self.vectors, self.slots, self.up_col)
        elif op == "silu_and_mul_scaled":
            ops.silu_and_mul_scaled(self.gate_up, self.vectors, self.slots, self.up_col, out=self.out)
        elif op == "silu_and_mul":  # same kernel, target off: the plain op PEDRO replaces
            ops.silu_and_mul_scaled(self.gate_up, self.vectors, self.slots, -1, out=self.out)

    def nbytes(self, op) -> int:
        T, es = self.T, self.es
        return es * T * {"scale_qkv_": 3 * (self.q + self.kv), "scale_": 3 * self.ff,
                         "silu_and_mul_scaled": 4 * self.ff, "silu_and_mul": 3 * self.ff}[op]

    def check(self, op) -> str | None:
        """Run op once on fresh data (NaN-poisoned output); None if every element matches."""
        if op in ("scale_qkv_", "scale_"):
            x = self.qkv if op == "scale_qkv_" else self.up
            x.copy_(torch.randn(x.shape).to(x.dtype))
            want = x.clone()
            if op == "scale_qkv_":
                reference.scale_qkv_(want, self.vectors, self.slots, self.q, self.kv,
                                     self.q_col, -1, self.v_col)
            else:
                reference.scale_(want, self.vectors, self.slots, self.up_col)
            self.run(op)
            got, tol = x, dict(atol=0, rtol=0)  # one fp32 product, one rounding: exact
        else:
            self.gate_up.copy_(torch.randn(self.gate_up.shape).to(self.dtype))
            self.out.fill_(float("nan"))
            col = self.up_col if op == "silu_and_mul_scaled" else -1
            torch_order = ops.backend_name(self.device) == "torch"
            want = _silu_mul_oracle(self.gate_up, self.vectors, self.slots, col, torch_order)
            self.run(op)
            got, tol = self.out, {}
        try:
            torch.testing.assert_close(got, want, **tol)
        except AssertionError as e:
            return str(e).splitlines()[0]
        return None


OPS = ["scale_qkv_", "scale_", "silu_and_mul_scaled", "silu_and_mul"]


def _silu_mul_oracle(gate_up, vectors, slots, col, torch_order=False):
    """The GPU kernels' definition: silu(g) * u * v in fp32, one rounding. The torch
    reference's (torch_order): U' = u * v rounded to the dtype first, then silu(g) and the
    product each rounded (the transformers model's order; vLLM's native SiluAndMul at v = 1)."""
    D, dt = gate_up.shape[1] // 2, gate_up.dtype
    g, u = gate_up[:, :D].float(), gate_up[:, D:].float()
    v = vectors[:, col:col + D].index_select(0, slots[:gate_up.shape[0]]).float() if col >= 0 else 1.0
    if torch_order:
        u = (u * v).to(dt).float()
        return (torch.nn.functional.silu(g).to(dt).float() * u).to(dt)
    return (torch.nn.functional.silu(g) * u * v).to(dt)


# ---- LoRA baseline ----

def lora_fn(shape, dtype, T, tenants, r, device, gen):
    """Rank-r LoRA on q, v, up for T tokens from `tenants` adapters: gather A/B per token, bmm."""
    d = shape["d"]
    outs = {"q": shape["q"], "v": shape["kv"], "up": shape["ff"]}
    A = {k: (0.02 * torch.randn(tenants, d, r, generator=gen)).to(dtype).to(device) for k in outs}
    B = {k: (0.02 * torch.randn(tenants, r, n, generator=gen)).to(dtype).to(device)
         for k, n in outs.items()}
    idx = torch.randint(0, tenants, (T,), generator=gen).to(device)
    x = torch.randn(T, 1, d, generator=gen).to(dtype).to(device)
    ys = {k: torch.zeros(T, n, dtype=dtype, device=device) for k, n in outs.items()}

    def fn():
        for k in outs:
            h = torch.bmm(x, A[k][idx])  # shrink: [T, 1, r]
            ys[k].add_(torch.bmm(h, B[k][idx]).squeeze(1))  # expand
    return fn


# ---- the runs ----

def smoke(out_dir: Path) -> int:
    """CPU, torch backend, correctness only: exercises this script without a GPU."""
    os.environ[ops.ENV_BACKEND] = "torch"
    gen = torch.Generator().manual_seed(0)
    rows, bad = [], 0
    for dname, dtype in DTYPES.items():
        for T in (1, 5):
            case = Case(MODELS["SmolLM2-135M"], dtype, T, "cpu", gen, base_frac=0.25)
            for op in OPS:
                err = case.check(op)
                bad += err is not None
                rows.append(dict(model="SmolLM2-135M", dtype=dname, T=T, op=op, backend="torch",
                                 ok=err is None, error=err))
            lora_fn(MODELS["SmolLM2-135M"], dtype, T, min(T, 8), 8, "cpu", gen)()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_gather_scale_smoke.json"
    path.write_text(json.dumps(dict(mode="smoke", correct=bad == 0, rows=rows), indent=1))
    print(f"smoke: {len(rows) - bad}/{len(rows)} checks passed -> {path}")
    return 1 if bad else 0


def available_backends(wanted) -> list[str]:
    names = []
    for name in wanted:
        os.environ[ops.ENV_BACKEND] = name
        if name == "cuda":
            print("loading the CUDA op (JIT-builds csrc/ if vllm_pedro._C is not built)...",
                  flush=True)
        try:
            ops.backend_name("cuda")
            names.append(name)
        except ops.BackendUnavailableError as e:
            print(f"skipping backend {name}: {e}")
    return names


def bench(out_dir: Path, backends: list[str], models: list[str], dev="cuda") -> int:
    dev = torch.device(dev)
    gen = torch.Generator().manual_seed(0)
    backends = available_backends(backends)
    if not backends:
        print("no backend to benchmark")
        return 1
    rows, compare, bad = [], [], 0
    t_start = time.time()
    for model in models:
        shape = MODELS[model]
        for dname, dtype in DTYPES.items():
            for T in TOKENS:
                pedro = {}
                for name in backends:
                    os.environ[ops.ENV_BACKEND] = name
                    checked = Case(shape, dtype, T, dev, gen, base_frac=0.25)
                    timed = Case(shape, dtype, T, dev, gen)  # all tokens slotted: worst case
                    us = {}
                    for op in OPS:
                        err = checked.check(op)
                        if err:
                            bad += 1
                            print(f"MISMATCH {model} {dname} T={T} {name} {op}: {err}")
                        us[op] = time_us(lambda: timed.run(op))
                        nb = timed.nbytes(op)
                        cus = copy_us(nb, dev)
                        rows.append(dict(model=model, dtype=dname, T=T, backend=name, op=op,
                                         ok=err is None, us=us[op], bytes=nb,
                                         gbps=nb / us[op] / 1e3, copy_us=cus,
                                         copy_gbps=nb / cus / 1e3, pct_of_copy=100 * cus / us[op]))
                    pedro[name] = us["scale_qkv_"] + max(
                        0.0, us["silu_and_mul_scaled"] - us["silu_and_mul"])
                for tenants in sorted({min(n, T) for n in TENANTS}):
                    lora = {r: time_us(lora_fn(shape, dtype, T, tenants, r, dev, gen))
                            for r in RANKS}
                    compare.append(dict(model=model, dtype=dname, T=T, tenants=tenants,
                                        **{f"pedro_{b}_us": u for b, u in pedro.items()},
                                        **{f"lora_r{r}_us": u for r, u in lora.items()}))
                torch.cuda.empty_cache()
        print(f"[{model} done, {time.time() - t_start:.0f}s]", flush=True)

    print_tables(rows, compare, backends)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, timing="CUDA graph of 20 calls, median of 30 replays",
                correct=bad == 0, seconds=round(time.time() - t_start, 1))
    path = out_dir / "bench_gather_scale.json"
    path.write_text(json.dumps(dict(meta=meta, rows=rows, compare=compare), indent=1))
    print(f"wrote {path}")
    plot(rows, compare, backends, out_dir / "bench_gather_scale.png", meta["device"])
    return 1 if bad else 0


def print_tables(rows, compare, backends):
    print(f"\n{'model':<13} {'dt':<4} {'T':>4} {'backend':<7} {'op':<20} {'ok':<3} "
          f"{'us':>7} {'GB/s':>7} {'copy GB/s':>9} {'%copy':>6}")
    for r in rows:
        print(f"{r['model']:<13} {r['dtype']:<4} {r['T']:>4} {r['backend']:<7} {r['op']:<20} "
              f"{'ok' if r['ok'] else 'BAD':<3} {r['us']:>7.2f} {r['gbps']:>7.1f} "
              f"{r['copy_gbps']:>9.1f} {r['pct_of_copy']:>5.0f}%")
    cols = [f"pedro_{b}_us" for b in backends] + [f"lora_r{r}_us" for r in RANKS]
    print(f"\nper-layer cost of targets q, v, up (us)\n{'model':<13} {'dt':<4} {'T':>4} "
          f"{'ten':>4} " + " ".join(f"{c:>16}" for c in cols))
    for c in compare:
        print(f"{c['model']:<13} {c['dtype']:<4} {c['T']:>4} {c['tenants']:>4} "
              + " ".join(f"{c[k]:>16.2f}" for k in cols))


def plot(rows, compare, backends, path, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0][j]
        cmp = [c for c in compare if c["model"] == model and c["dtype"] == "fp16"]
        for key in [f"pedro_{b}_us" for b in backends] + [f"lora_r{r}_us" for r in RANKS]:
            pts = {}
            for c in cmp:  # most tenants per T: LoRA's worst case
                pts[c["T"]] = c[key]
            ax.plot(list(pts), list(pts.values()), marker="o", label=key[:-3])
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us per layer (q, v, up)",
               title=f"{model} fp16")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for op in OPS:
            for b in backends:
                pts = [(r["T"], r["pct_of_copy"]) for r in rows if r["model"] == model
                       and r["dtype"] == "fp16" and r["op"] == op and r["backend"] == b]
                ax.plot(*zip(*pts), marker=".", label=f"{op} {b}")
        ax.set(xscale="log", xlabel="tokens", ylabel="% of D2D copy bandwidth", ylim=(0, None))
        ax.legend(fontsize=6)
    fig.suptitle(f"PEDRO gather-scale vs LoRA, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--smoke", action="store_true", help="CPU, torch backend, correctness only")
    args = p.parse_args(argv)
    if args.smoke:
        return smoke(args.out)
    if not torch.cuda.is_available():
        print("bench_gather_scale.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --smoke for a CPU correctness run.", file=sys.stderr)
        return 2
    return bench(args.out, args.backends, args.models)


if __name__ == "__main__":
    sys.exit(main())
