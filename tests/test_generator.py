"""Poolers, the rational activation and VectorGenerator against naive float64 oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_pedro.generator import (GELU_DENOMINATOR, GELU_NUMERATOR, POOLER_CODES, VectorGenerator,
                                  rational, segment_pool)

CODE_NAMES = {v: k for k, v in POOLER_CODES.items()}


# -- oracles -------------------------------------------------------------------------------
def naive_pool(rows: torch.Tensor, pooler: str, w: torch.Tensor | None) -> torch.Tensor:
    rows = rows.double()
    if pooler == "attention":
        a = torch.softmax(rows @ w.double(), dim=0)
        return (a[:, None] * rows).sum(0)
    if pooler == "mean":
        return rows.mean(0)
    return rows[-1]


def naive_rational(x: torch.Tensor, num, den) -> torch.Tensor:
    x = x.double()
    p = sum(float(a) * x ** k for k, a in enumerate(num))
    q = 1.0 + sum(abs(float(b)) * x.abs() ** (k + 1) for k, b in enumerate(den))
    return p / q


def ragged(gen: torch.Generator, lengths: list[int], d: int, interleave: bool):
    """Random hidden states of len(lengths) prompts flattened to [N, d] with a segment id per
    token; with `interleave`, segments are shuffled together (order within each kept)."""
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    if interleave:
        keys = torch.rand(len(seg), generator=gen)
        # stable order within a segment: sort by random key, then fix each segment's order
        perm = torch.argsort(keys)
        seg = seg[perm]
        # tokens of a segment appear in their prompt order: generate h in that order
    h = torch.randn(len(seg), d, generator=gen) * torch.rand(len(seg), 1, generator=gen) * 3
    rows = [h[seg == i] for i in range(len(lengths))]  # prompt order = order of appearance
    return h, seg, rows


# -- poolers -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("interleave", [False, True])
def test_segment_pool_mixed_poolers_match_naive_oracle(seed, interleave):
    gen = torch.Generator().manual_seed(seed)
    nseg = 7
    lengths = torch.randint(1, 12, (nseg,), generator=gen).tolist()
    lengths[0] = 1  # a one-token prompt
    d = 16
    h, seg, rows = ragged(gen, lengths, d, interleave)
    codes = torch.randint(0, 3, (nseg,), generator=gen)
    codes[:3] = torch.tensor([0, 1, 2])  # every pooler at least once
    w = torch.randn(d, generator=gen) * (10.0 if seed % 2 else 1.0)  # large scores: stability
    out = segment_pool(h, seg, nseg, codes, h @ w)
    assert out.shape == (nseg, d) and out.dtype == h.dtype
    for i in range(nseg):
        want = naive_pool(rows[i], CODE_NAMES[int(codes[i])], w)
        torch.testing.assert_close(out[i].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_segment_pool_without_scores_mean_and_last(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(1, 9, (5,), generator=gen).tolist()
    h, seg, rows = ragged(gen, lengths, 8, interleave=True)
    codes = torch.randint(1, 3, (5,), generator=gen)  # mean or last only
    out = segment_pool(h, seg, 5, codes, None)
    for i in range(5):
        torch.testing.assert_close(out[i].double(), naive_pool(rows[i], CODE_NAMES[int(codes[i])], None),
                                   atol=1e-6, rtol=1e-6)


def test_segment_pool_gradients_match_oracle():
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 5, 1, 4]
    h, seg, _ = ragged(gen, lengths, 6, interleave=False)
    w = torch.randn(6, generator=gen)
    codes = torch.tensor([0, 1, 2, 0])
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    segment_pool(h1, seg, 4, codes, h1 @ w1).pow(2).sum().backward()
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    sum(naive_pool(h2[seg == i], CODE_NAMES[int(codes[i])], w2).pow(2).sum() for i in range(4)).backward()
    torch.testing.assert_close(h1.grad.double(), h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, atol=1e-5, rtol=1e-5)


# -- rational activation ---------------------------------------------------------------------
def test_rational_init_approximates_gelu_on_minus6_6():
    x = torch.cat([torch.linspace(-6, 6, 24001, dtype=torch.float64),
                   torch.empty(5000, dtype=torch.float64).uniform_(-6, 6)])
    num = torch.tensor(GELU_NUMERATOR, dtype=torch.float64)
    den = torch.tensor(GELU_DENOMINATOR, dtype=torch.float64)
    err = (rational(x, num, den) - F.gelu(x)).abs().max()
    assert err < 0.03, f"max |R - gelu| = {err}"
    # float32 path (what the generator runs) too
    err32 = (rational(x.float(), num.float(), den.float()) - F.gelu(x.float())).abs().max()
    assert err32 < 0.03


@pytest.mark.parametrize("seed", range(4))
def test_rational_matches_oracle_denominator_at_least_one_and_finite_grads(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(257, generator=gen, dtype=torch.float64) * 4
    x[:3] = torch.tensor([0.0, -0.0, 1e-30])  # exact zeros: pow/abs gradients
    num = torch.randn(7, generator=gen, dtype=torch.float64)
    den = torch.randn(5, generator=gen, dtype=torch.float64)  # negative coefficients included
    assert (den < 0).any()
    torch.testing.assert_close(rational(x, num, den), naive_rational(x, num, den), atol=1e-9, rtol=1e-9)
    # numerator 1 => output is 1 / denominator; the denominator must be >= 1 everywhere
    one = torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    inv_q = rational(x, one, den)
    assert ((inv_q > 0) & (inv_q <= 1.0)).all()
    q = 1.0 / inv_q
    q_oracle = 1.0 + sum(abs(float(b)) * x.abs() ** (k + 1) for k, b in enumerate(den))
    torch.testing.assert_close(q, q_oracle, atol=1e-9, rtol=1e-9)
    # gradients finite for x and both coefficient sets, in float32
    x32 = x.float().requires_grad_()
    n32 = num.float().requires_grad_()
    d32 = den.float().requires_grad_()
    rational(x32, n32, d32).sum().backward()
    for g in (x32.grad, n32.grad, d32.grad):
        assert g is not None and torch.isfinite(g).all()
    # gradient values against float64 autograd of the oracle
    x64, n64, d64 = x.clone().requires_grad_(), num.clone().requires_grad_(), den.clone().requires_grad_()
    p = sum(n64[k] * x64 ** k for k in range(7))
    qq = 1.0 + sum(d64[k].abs() * x64.abs() ** (k + 1) for k in range(5))
    (p / qq).sum().backward()
    torch.testing.assert_close(n32.grad.double(), n64.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(d32.grad.double(), d64.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(x32.grad[3:].double(), x64.grad[3:], atol=1e-3, rtol=1e-4)


def test_rational_per_row_coefficients_broadcast():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    num = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    den = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    out = rational(x, num, den)
    for i in range(5):
        torch.testing.assert_close(out[i], naive_rational(x[i], num[i].tolist(), den[i].tolist()))


# -- VectorGenerator -------------------------------------------------------------------------
POOLERS = ["attention", "last", "mean"]
ACTS = ["rational", "gelu", "relu", "silu"]


def randomize(g: VectorGenerator, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.startswith("rat_"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def naive_generator(g: VectorGenerator, rows: torch.Tensor) -> torch.Tensor:
    w = g.pool_w.double() if g.pooler == "attention" else None
    pooled = naive_pool(rows, g.pooler, w)
    z = g.down.weight.double() @ pooled + g.down.bias.double()
    if g.activation == "rational":
        z = naive_rational(z, g.rat_num.tolist(), g.rat_den.tolist())
    else:
        z = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[g.activation](z)
    return 1.0 + g.up.weight.double() @ z + g.up.bias.double()


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("activation", ACTS)
def test_fresh_generator_emits_exact_ones(pooler, activation):
    gen = torch.Generator().manual_seed(3)
    g = VectorGenerator(24, 5, 40, pooler, activation)
    h, seg, _ = ragged(gen, [4, 1, 7], 24, interleave=False)
    out = g(h, seg, 3)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.ones(3, 40))


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("activation", ACTS)
def test_generator_matches_naive_oracle(pooler, activation):
    gen = torch.Generator().manual_seed(hash((pooler, activation)) % 1000)
    d, r, out = 24, 6, 33
    g = VectorGenerator(d, r, out, pooler, activation)
    randomize(g, gen)
    lengths = [5, 1, 9, 3]
    h, seg, rows = ragged(gen, lengths, d, interleave=False)
    got = g(h, seg, len(lengths))
    assert got.shape == (len(lengths), out)
    for i in range(len(lengths)):
        torch.testing.assert_close(got[i].double(), naive_generator(g, rows[i]), atol=1e-4, rtol=1e-4)
    # the vectors are prompt dependent: different prompts give different vectors
    assert (got[0] - got[2]).abs().max() > 1e-3
    # gradients reach every parameter
    got.sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("activation", ["rational", "relu"])
def test_generator_parameter_count(pooler, activation):
    d, r, out = 40, 7, 123
    g = VectorGenerator(d, r, out, pooler, activation)
    expected = d * r + r + r * out + out + (d if pooler == "attention" else 0) + (
        7 + 5 if activation == "rational" else 0)
    assert sum(p.numel() for p in g.parameters()) == expected


def test_low_precision_generator_returns_float32_vectors():
    gen = torch.Generator().manual_seed(5)
    g = VectorGenerator(16, 4, 20, dtype=torch.bfloat16)
    randomize(g, gen)
    assert all(p.dtype == torch.bfloat16 for p in g.parameters())
    h, seg, rows = ragged(gen, [3, 6], 16, interleave=False)
    out = g(h.bfloat16(), seg, 2)
    assert out.dtype == torch.float32
    for i in range(2):  # oracle on the same (bf16-rounded) inputs and weights
        torch.testing.assert_close(out[i].double(), naive_generator(g, rows[i].bfloat16()), atol=1e-4, rtol=1e-4)


def test_gradients_are_repeatable_with_several_threads():
    """Training is repeatable bit for bit: the generator's gathers have deterministic
    backwards (index_select -> index_add), not advanced indexing, whose backward
    accumulates in a thread-dependent order on the CPU. Run with 2 threads in a fresh
    process (vLLM may have pinned this one's thread count)."""
    import subprocess
    import sys

    code = """
import torch
torch.set_num_threads(2)
from vllm_pedro.generator import VectorGenerator
def grads():
    torch.manual_seed(0)
    g = VectorGenerator(96, 8, 200, "attention", "rational")
    torch.nn.init.normal_(g.up.weight, std=0.1)
    h = torch.randn(3000, 96)
    g(h, torch.repeat_interleave(torch.arange(6), 500), 6).sum().backward()
    return [p.grad.clone() for p in g.parameters()]
a, b = grads(), grads()
print("SAME" if all(torch.equal(x, y) for x, y in zip(a, b)) else "DIFFERENT")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("SAME"), out.stdout + out.stderr
