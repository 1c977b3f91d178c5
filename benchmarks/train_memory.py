#!/usr/bin/env python
"""Peak memory of PEDRO training steps, as `vllm-pedro train` runs them, for

  baseline    float32
  ckpt        --gradient-checkpointing (the base model's decoder layers recomputed in backward)
  bf16        --bf16 (bf16 autocast; base weights, generators and AdamW state stay float32)
  ckpt+bf16   both

Each configuration runs in its own process: load the model, attach a fresh adapter
(r=16, the default targets q v up), then `--steps` optimiser steps on one synthetic
batch (`--batch-size` rows of `--seq-len` tokens, the last `--response-len` of each row
the response). Measured: the resident set after loading (model, every weight paged in,
adapter, no activations),
its peak during the steps (Linux VmHWM, reset after loading through /proc/self/clear_refs;
getrusage's lifetime peak where that is refused) and, on CUDA,
torch.cuda.max_memory_allocated over the steps. Step times are recorded but, on a shared
machine, mean little; the memory does not depend on the load.

    python benchmarks/train_memory.py --output-json benchmarks/results/train_memory_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"baseline": dict(gradient_checkpointing=False, bf16=False),
           "ckpt": dict(gradient_checkpointing=True, bf16=False),
           "bf16": dict(gradient_checkpointing=False, bf16=True),
           "ckpt+bf16": dict(gradient_checkpointing=True, bf16=True)}
DEFAULT_MODEL = os.path.expanduser("~/.cache/vllm-pedro/models/smollm2-135m")
MIB = 1 << 20


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synthetic_batch(vocab: int, batch_size: int, seq_len: int, response_len: int, seed: int):
    """Random token ids (memory does not depend on what the tokens are)."""
    import torch

    from vllm_pedro.data import Example, collate

    g = torch.Generator().manual_seed(seed)
    rows = [Example(torch.randint(100, vocab, (seq_len,), generator=g).tolist(), seq_len - response_len)
            for _ in range(batch_size)]
    return collate(rows, pad_id=0)


def one_config(name: str, args: argparse.Namespace) -> dict:
    """In this process: load, wrap, reset the peak, run the steps."""
    import torch

    from vllm_pedro.train import (TrainArgs, autocast_dtype, accumulate_gradients, enable_gradient_checkpointing,
                                  load_base_model, resolve_device, set_seed, wrap_model)

    torch.set_num_threads(args.threads)
    targs = TrainArgs(model=args.model, train_file="", output_dir="", r=args.r, **CONFIGS[name])
    device = resolve_device(args.device)
    model, tok = load_base_model(args.model, "float32", device)
    set_seed(0)
    model = wrap_model(model, targs)
    if targs.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = synthetic_batch(len(tok), args.batch_size, args.seq_len, args.response_len, seed=0)
    with torch.no_grad():  # page in the weights (safetensors maps the file): "after load" includes them
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    after_load = rss_bytes()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(accumulate_gradients(model, [batch], autocast_dtype(targs)))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    peak = rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": name, **CONFIGS[name], "device": str(device),
        "rss_after_load_mib": after_load / MIB, "peak_rss_mib": peak / MIB,
        "peak_rss_over_load_mib": (peak - after_load) / MIB,
        "peak_is": "VmHWM since the reset after loading" if reset else "getrusage lifetime peak (reset refused)",
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer_state_dtypes": sorted({str(v.dtype) for s in optimizer.state.values() for v in s.values()
                                          if torch.is_tensor(v) and v.dim() > 0}),
        "losses": losses, "step_s": times,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model folder (vllm-pedro fetch-model smollm2-135m)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--response-len", type=int, default=32, help="response tokens per row (the loss)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--output-json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT=" + json.dumps(one_config(args.one, args)))
        return 0
    from tqdm.auto import tqdm

    results = {}
    common = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size), "--seq-len",
              str(args.seq_len), "--response-len", str(args.response_len), "--steps", str(args.steps), "--r",
              str(args.r), "--threads", str(args.threads), "--device", args.device]
    for name in tqdm(args.configs, desc="configs"):  # one process each: a peak of its own
        out = subprocess.run([*common, "--one", name], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT=")][-1][7:])
    report = {
        "model": os.path.basename(os.path.normpath(args.model)), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "response_len": args.response_len, "steps": args.steps, "r": args.r,
        "threads": args.threads, "device": args.device,
        "note": "memory is what to read; step times come from a shared, busy machine and mean little",
        "configs": results,
    }
    print_table(report)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, batch {report['batch_size']} x {report['seq_len']} tokens, {report['steps']} steps")
    cuda = any(r["cuda_max_allocated_mib"] is not None for r in report["configs"].values())
    head = f"{'config':<10} {'RSS after load':>15} {'peak RSS':>10} {'peak - load':>12}"
    print(head + (f" {'CUDA max alloc':>15}" if cuda else "") + f" {'final loss':>11}")
    for name, r in report["configs"].items():
        line = (f"{name:<10} {r['rss_after_load_mib']:>11.0f} MiB {r['peak_rss_mib']:>6.0f} MiB "
                f"{r['peak_rss_over_load_mib']:>8.0f} MiB")
        if cuda:
            line += f" {r['cuda_max_allocated_mib']:>11.0f} MiB"
        print(line + f" {r['losses'][-1]:>11.4f}")


if __name__ == "__main__":
    sys.exit(main())
