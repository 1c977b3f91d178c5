"""The vLLM prefill generator (prefill.write_vectors over a PrefillStep) against the
reference, generator.generate_vectors, on random flat batches: many prompts of different
lengths (one token included) among base tokens, every pooler and activation, ranks and
targets differing by row, rows shared by several prompts; every pooling implementation
(the torch formulation, the C++ CPU op, Triton interpreted on the CPU / compiled on a GPU),
every element of every written slot row checked, the other slot rows untouched."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # Triton has no CPU backend: interpret it (as tests/test_ops.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_pedro.config import ACTIVATIONS, POOLERS  # noqa: E402
from vllm_pedro.generator import (ACTIVATION_CODES, GELU_DENOMINATOR, GELU_NUMERATOR, POOLER_CODES,  # noqa: E402
                                  StackedGenerators, activate, generate_vectors, rational_horner)
from vllm_pedro.ops import cpu as ops_cpu  # noqa: E402
from vllm_pedro.ops import reference  # noqa: E402
from vllm_pedro.prefill import PrefillStep, write_vectors  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
D, R, RANK = 48, 6, 8
TARGETS = {"q": (0, 48), "k": (48, 64), "v": (64, 80), "up": (80, 176)}  # a slot row: [q | k | v | up]
W = 176
# Per row: pooler, activation, rank, targets (rows 4 and 5 repeat kinds with other weights)
ROWS = [("attention", "rational", 8, ("q", "v", "up")), ("last", "gelu", 3, ("q", "k", "v", "up")),
        ("mean", "relu", 8, ("up",)), ("attention", "silu", 1, ("q", "v")),
        ("mean", "rational", 5, ("v", "up")), ("attention", "gelu", 8, ("q", "k", "v", "up"))]


def make_rows(gen: torch.Generator, dtype, device="cpu", rows=ROWS, zero_up=False) -> StackedGenerators:
    """R adapters in the adapter cache's layout: rank r_i in the first r_i rank columns,
    zeros after; W_up = b_up = 0 in the columns of targets a row lacks."""
    n = len(rows)
    g = dict(pool_w=torch.randn(n, D, generator=gen) / D ** 0.5 * 4, down_w=torch.randn(n, RANK, D, generator=gen) / D ** 0.5,
             down_b=torch.randn(n, RANK, generator=gen) * 0.3, up_w=torch.randn(n, W, RANK, generator=gen) * 0.3,
             up_b=torch.randn(n, W, generator=gen) * 0.1,
             rat_num=torch.tensor(GELU_NUMERATOR) + 0.05 * torch.randn(n, 7, generator=gen),
             rat_den=torch.tensor(GELU_DENOMINATOR) + 0.05 * torch.randn(n, 5, generator=gen))
    for i, (_, _, r, targets) in enumerate(rows):
        g["down_w"][i, r:] = 0
        g["down_b"][i, r:] = 0
        g["up_w"][i, :, r:] = 0
        for t, (lo, hi) in TARGETS.items():
            if t not in targets or zero_up:
                g["up_w"][i, lo:hi] = 0
                g["up_b"][i, lo:hi] = 0
    g = {k: v.to(dtype).to(device) for k, v in g.items()}
    return StackedGenerators(
        **g, pooler_code=torch.tensor([POOLER_CODES[p] for p, *_ in rows], device=device),
        act_code=torch.tensor([ACTIVATION_CODES[a] for _, a, *_ in rows], device=device),
        poolers=frozenset(p for p, *_ in rows), activations=frozenset(a for _, a, *_ in rows))


def make_step(gen: torch.Generator, lengths: list[int], rows: list[int], num_slots: int, dtype, device="cpu"):
    """A flat batch: the prompts in batch order with base tokens (decodes, base prompts)
    around and between them; their slots distinct, in any order. Returns x, the step, and
    each prompt's (start, length, row, slot) in batch order."""
    gaps = torch.randint(0, 5, (len(lengths) + 1,), generator=gen).tolist()
    pos, starts = gaps[0], []
    for n, gap in zip(lengths, gaps[1:]):
        starts.append(pos)
        pos += n + gap
    x = (torch.randn(pos + 3, D, generator=gen) * torch.rand(pos + 3, 1, generator=gen) * 3).to(dtype).to(device)
    slots = torch.randperm(num_slots, generator=gen)[:len(lengths)].tolist()
    kinds = {ROWS[r] for r in rows}  # the poolers and activations the step uses
    step = PrefillStep.from_host(np.array(starts), np.array(lengths), np.array(rows), np.array(slots),
                                 frozenset(p for p, *_ in kinds), frozenset(a for _, a, *_ in kinds), device)
    return x, step, list(zip(starts, lengths, rows, slots))


def reference_vectors(x, prompts, g) -> torch.Tensor:
    """generate_vectors (the transformers reference's function) on the gathered prompt tokens."""
    h = torch.cat([x[b:b + n] for b, n, _, _ in prompts])
    seg = torch.repeat_interleave(torch.arange(len(prompts), device=x.device),
                                  torch.tensor([n for _, n, _, _ in prompts], device=x.device))
    return generate_vectors(h, seg, torch.tensor([r for _, _, r, _ in prompts], device=x.device), g)


def _impls():
    out = ["torch", "cpu"]
    if HAS_TRITON and INTERPRET:
        out.append("triton")
    return out


def pool_fn(impl):
    if impl == "cpu":
        ok, why = ops_cpu.load()
        if not ok:
            pytest.skip(f"the C++ CPU op cannot be built here: {why}")
        return ops_cpu.pool_prompts
    if impl == "triton":
        from vllm_pedro.ops import triton_kernels
        return triton_kernels.pool_prompts
    return reference.pool_prompts


# float32: torch's float32 defaults. bf16 / fp16 slots: one unit in the last place of the
# slot dtype (the reference's float32 vector and ours may round to neighbours), plus the
# float32 atol for values near 0 (1 + delta with delta near -1 cancels, and a float32
# difference of 1e-7 there is more than one fp16 ulp).
TOL = {torch.float32: dict(atol=1e-5, rtol=1.3e-6), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7),
       torch.float16: dict(atol=1e-5, rtol=2 ** -10)}


def check(impl, dtype, seed, lengths, rows, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    g = make_rows(gen, dtype, device)
    num_slots = len(lengths) + 5
    x, step, prompts = make_step(gen, lengths, rows, num_slots, dtype, device)
    vectors = torch.full((num_slots, W), float("nan"), dtype=dtype, device=device)
    write_vectors(vectors, x, step, g, pool_fn(impl))
    want = reference_vectors(x, prompts, g).to(dtype)
    slots = [s for *_, s in prompts]
    torch.testing.assert_close(vectors[slots].float(), want.float(), **TOL[dtype])
    untouched = [s for s in range(num_slots) if s not in slots]
    assert torch.isnan(vectors[untouched]).all()


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_write_vectors_matches_generate_vectors(impl, dtype, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    S = 17
    lengths = torch.randint(1, 30, (S,), generator=gen).tolist()
    lengths[seed] = 1  # a one-token prompt
    rows = torch.randint(0, R, (S,), generator=gen).tolist()
    rows[:R] = range(R)  # every row, so every pooler, activation, rank and target set
    check(impl, dtype, seed, lengths, rows)


@pytest.mark.parametrize("impl", _impls())
def test_write_vectors_one_row_and_one_prompt(impl):
    check(impl, torch.float32, 7, [9], [2])  # one prompt
    check(impl, torch.float32, 8, [1, 5, 2, 8], [4, 4, 4, 4])  # one group, every prompt the same row


def test_activate_by_horner_matches_the_reference():
    """The activation with the rational by Horner's rule (vLLM's prefill) vs by powers (the
    reference), every
    kind mixed across prompts, |z| up to 12 where x^6 is large, negative coefficients."""
    gen = torch.Generator().manual_seed(5)
    g = make_rows(gen, torch.float32)
    g.rat_num.copy_(torch.randn(R, 7, generator=gen))
    g.rat_den.copy_(torch.randn(R, 5, generator=gen))
    rows = torch.randint(0, R, (300,), generator=gen)
    z = torch.randn(300, RANK, generator=gen) * 4
    z[:, 0] = torch.linspace(-12, 12, 300)
    z[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    torch.testing.assert_close(activate(z, g, rows, rational_horner), activate(z, g, rows), atol=1e-5, rtol=1.3e-6)


def test_untrained_rows_write_exact_ones():
    """W_up = b_up = 0: every slot row written is exactly 1 (the base model)."""
    gen = torch.Generator().manual_seed(3)
    g = make_rows(gen, torch.float32, zero_up=True)
    x, step, prompts = make_step(gen, [4, 1, 7, 3], [0, 1, 2, 5], 6, torch.float32)
    vectors = torch.zeros(6, W)
    write_vectors(vectors, x, step, g, reference.pool_prompts)
    assert torch.equal(vectors[[s for *_, s in prompts]], torch.ones(4, W))


def test_step_groups_prompts_by_row():
    gen = torch.Generator().manual_seed(4)
    _, step, prompts = make_step(gen, [3, 1, 4, 1, 5, 9, 2], [5, 0, 5, 2, 0, 5, 2], 9, torch.float32)
    assert step.rows.tolist() == [0, 0, 2, 2, 5, 5, 5]
    assert step.groups == ((0, 0, 2), (2, 2, 4), (5, 4, 7))
    assert step.num_tokens == 25
    # stable: within a row, batch order; each prompt keeps its span and slot
    by_row = sorted(prompts, key=lambda p: p[2])
    assert step.starts.tolist() == [p[0] for p in by_row] and step.slots.tolist() == [p[3] for p in by_row]
    assert step.lengths.tolist() == [p[1] for p in by_row]
    assert step.poolers <= set(POOLERS) and step.activations <= set(ACTIVATIONS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the same cases with "
                    "Triton interpreted: test_write_vectors_matches_generate_vectors)")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_write_vectors_matches_generate_vectors(impl):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for seed in range(3):
            gen = torch.Generator().manual_seed(200 + seed)
            lengths = torch.randint(1, 300, (40,), generator=gen).tolist()
            lengths[0] = 1
            rows = torch.randint(0, R, (40,), generator=gen).tolist()
            rows[:R] = range(R)
            check(impl, dtype, seed, lengths, rows, "cuda")


def test_benchmarks_run(tmp_path):
    """benchmarks/prefill_generator.py (tiny step, every variant) and the GPU check's
    bench_prefill_pool.py in its CPU mode (every path checked against the old one) run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "prefill.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "prefill_generator.py"), "--steps", "4x8", "--mixed",
                           "--rounds", "1", "--reps", "1", "--step-rounds", "1", "--output-json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert {"whole: old", "whole: new, torch pooling", "projections: per row (shipped)"} <= set(row["ms_per_step"])
    assert row["forward_ms"]["median"] > 0
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "kernels" / "bench_prefill_pool.py"), "--cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
