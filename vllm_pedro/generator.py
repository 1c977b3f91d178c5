"""The PEDRO vector generator in pure torch: poolers, the rational activation, and one
batched forward, `generate_vectors`, that runs the generators of many adapters (rows of a
`StackedGenerators`) over many prompts at once.

Everything works on *ragged segments*: hidden states of many prompts flattened into
[N, d] plus a segment id per token. The transformers reference (`VectorGenerator`, one
adapter: one row) and the vLLM plugin's device adapter cache (one row per resident
adapter) both call `generate_vectors`; there is no second copy of the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVATIONS, POOLERS

POOLER_CODES = {p: i for i, p in enumerate(POOLERS)}
ACTIVATION_CODES = {a: i for i, a in enumerate(ACTIVATIONS)}

# Safe Pade activation unit (Molina et al., 2020, "version D"):
#   R(x) = (a0 + a1 x + ... + a6 x^6) / (1 + |b1||x| + ... + |b5||x|^5)
# The denominator is >= 1 for every x, so it never approaches zero. These coefficients
# were fitted to GELU on [-6, 6] by least squares (max abs error < 0.03 there); see
# tests/test_generator.py, which checks the fit.
GELU_NUMERATOR = (
    -0.00486245919979579, 0.5026665891473979, 0.40039689265765455, 0.15567772962907775,
    0.04945646952261255, 0.010195951046565505, 0.000819785122555558)
GELU_DENOMINATOR = (
    0.06809034085156254, 0.26257041500190725, 0.011252366126693805, 0.019585319824083756,
    8.363268528071125e-13)


def rational(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Safe Pade activation. x: [..., r]; num: [..., 7] and den: [..., 5] broadcast
    over x's leading dims (one coefficient set per row, so many adapters batch)."""
    num = num.unsqueeze(-2)  # [..., 1, 7] against x[..., r, 1]
    den = den.unsqueeze(-2)
    xe = x.unsqueeze(-1)
    powers = torch.arange(num.shape[-1], device=x.device, dtype=x.dtype)
    p = (num * xe.pow(powers)).sum(-1)
    q = 1.0 + (den.abs() * xe.abs().pow(powers[1:den.shape[-1] + 1])).sum(-1)
    return p / q


FIXED_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def segment_pool(h: torch.Tensor, seg: torch.Tensor, num_segments: int,
                 pooler_codes: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """Pool ragged prompts. h: [N, d] (tokens in prompt order within each segment);
    seg: [N] int64 segment id; pooler_codes: [num_segments] (POOLER_CODES) so segments
    of different adapters may use different poolers; scores: [N] attention logits
    (needed when any segment uses the attention pooler). Returns [num_segments, d]."""
    # Gathers are index_select (backward: index_add), never advanced indexing, whose
    # backward accumulates in a thread-dependent order on the CPU: training is repeatable.
    n, d = h.shape
    at = lambda t: t.index_select(0, seg)  # noqa: E731  (per segment -> per token)
    zeros = h.new_zeros(num_segments)
    counts = zeros.index_add(0, seg, torch.ones_like(seg, dtype=h.dtype))
    code = at(pooler_codes)
    # Each pooler is a weighting of its segment's tokens; compute all three, pick per token.
    mean_w = 1.0 / at(counts)
    last_idx = torch.full((num_segments,), -1, dtype=torch.long, device=h.device)
    last_idx = last_idx.scatter_reduce(0, seg, torch.arange(n, device=h.device), "amax")
    last_w = (torch.arange(n, device=h.device) == at(last_idx)).to(h.dtype)
    weights = torch.where(code == POOLER_CODES["mean"], mean_w, last_w)
    if scores is not None:
        s = torch.where(code == POOLER_CODES["attention"], scores, torch.zeros_like(scores))
        smax = torch.full_like(zeros, float("-inf")).scatter_reduce(0, seg, s, "amax")
        e = torch.exp(s - at(smax))
        att_w = e / at(zeros.index_add(0, seg, e))
        weights = torch.where(code == POOLER_CODES["attention"], att_w, weights)
    return h.new_zeros(num_segments, d).index_add(0, seg, weights.unsqueeze(-1) * h)


@dataclass
class StackedGenerators:
    """The generators of R adapters for one layer, one row each. A smaller rank r_i sits
    in the first r_i of the r rank columns with zeros after it (exactly r_i's output);
    a target an adapter lacks has W_up = b_up = 0 there (factor 1).

    `poolers` and `activations` name the kinds present among the rows a call uses; they
    are known on the host, so the forward runs only those branches and never syncs."""

    down_w: torch.Tensor  # [R, r, d]
    down_b: torch.Tensor  # [R, r]
    up_w: torch.Tensor  # [R, out, r]
    up_b: torch.Tensor  # [R, out]
    pooler_code: torch.Tensor  # [R] int64, POOLER_CODES
    act_code: torch.Tensor  # [R] int64, ACTIVATION_CODES
    poolers: frozenset[str]
    activations: frozenset[str]
    pool_w: torch.Tensor | None = None  # [R, d], needed when "attention" in poolers
    rat_num: torch.Tensor | None = None  # [R, 7], needed when "rational" in activations
    rat_den: torch.Tensor | None = None  # [R, 5]


def rational_horner(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """rational() for x [S, r] with one coefficient set per row (num [S, 7], den [S, 5]),
    by Horner's rule: the powers x^k of rational() (aten::pow) cost ~10x more at the sizes
    of vLLM's prefill. Equal to rational() up to float32 rounding."""
    den, ax = den.abs(), x.abs()
    p, q = num[:, -1:], den[:, -1:]
    for k in range(num.shape[1] - 2, -1, -1):
        p = torch.addcmul(num[:, k:k + 1], p, x)
    for k in range(den.shape[1] - 2, -1, -1):
        q = torch.addcmul(den[:, k:k + 1], q, ax)
    return p / torch.addcmul(torch.ones_like(x), q, ax)  # 1 + |b1| |x| + ... + |b5| |x|^5


def activate(z: torch.Tensor, g: StackedGenerators, seg_row: torch.Tensor, rational_fn=rational) -> torch.Tensor:
    """Each prompt's activation (g.act_code of its row; the rational coefficients of its
    row). rational_fn: rational (the reference's) or rational_horner (vLLM's prefill)."""
    out = None
    for name in sorted(g.activations):
        if name == "rational":
            y = rational_fn(z, g.rat_num.index_select(0, seg_row).float(), g.rat_den.index_select(0, seg_row).float())
        else:
            y = FIXED_ACTIVATIONS[name](z)
        if out is None:
            out = y
        else:
            code = g.act_code.index_select(0, seg_row)
            out = torch.where((code == ACTIVATION_CODES[name]).unsqueeze(1), y, out)
    return out


def generate_vectors(h: torch.Tensor, seg: torch.Tensor, seg_row: torch.Tensor,
                     g: StackedGenerators) -> torch.Tensor:
    """The vectors of S prompts, each through its own adapter's generator.

    h: [N, d] prompt hidden states (any dtype; math in float32); seg: [N] int64 prompt
    (segment) of each token; seg_row: [S] row of `g` for each prompt. Returns [S, out]
    float32 vectors, 1 + delta. Every prompt reads only its own row: the attention pooler
    scores each token against its own adapter's w, so the cost follows the prompts, not R."""
    h = h.float()
    num_segments = seg_row.shape[0]
    rows = lambda t: t.index_select(0, seg_row).float()  # noqa: E731  (each prompt's adapter row)
    scores = None
    if "attention" in g.poolers:
        scores = (h * g.pool_w.index_select(0, seg_row.index_select(0, seg)).float()).sum(-1)
    pooled = segment_pool(h, seg, num_segments, g.pooler_code.index_select(0, seg_row), scores)
    z = torch.einsum("sd,skd->sk", pooled, rows(g.down_w)) + rows(g.down_b)
    a = activate(z, g, seg_row)
    return 1.0 + torch.einsum("sk,swk->sw", a, rows(g.up_w)) + rows(g.up_b)


class VectorGenerator(nn.Module):
    """G_l: prompt hidden states -> 1 + delta, the scaling vectors of one layer, for one
    adapter (the transformers reference; training runs here).

    W_up and b_up start at zero, so a fresh generator emits all-ones vectors and the
    adapted model is exactly the base model."""

    def __init__(self, hidden_size: int, r: int, out_size: int, pooler: str = "attention",
                 activation: str = "rational", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.pooler, self.activation = pooler, activation
        if pooler == "attention":
            self.pool_w = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.down = nn.Linear(hidden_size, r, dtype=dtype)
        if activation == "rational":
            self.rat_num = nn.Parameter(torch.tensor(GELU_NUMERATOR, dtype=dtype))
            self.rat_den = nn.Parameter(torch.tensor(GELU_DENOMINATOR, dtype=dtype))
        self.up = nn.Linear(r, out_size, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def stacked(self) -> StackedGenerators:
        """This generator as the one row of a StackedGenerators (views, gradients flow)."""
        dev = self.down.weight.device
        one = lambda p: None if p is None else p.unsqueeze(0)  # noqa: E731
        return StackedGenerators(
            down_w=one(self.down.weight), down_b=one(self.down.bias), up_w=one(self.up.weight),
            up_b=one(self.up.bias), pool_w=one(getattr(self, "pool_w", None)),
            rat_num=one(getattr(self, "rat_num", None)), rat_den=one(getattr(self, "rat_den", None)),
            pooler_code=torch.tensor([POOLER_CODES[self.pooler]], device=dev),
            act_code=torch.tensor([ACTIVATION_CODES[self.activation]], device=dev),
            poolers=frozenset({self.pooler}), activations=frozenset({self.activation}))

    def forward(self, h: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
        """h: [N, d] prompt hidden states of all segments; seg: [N]. Returns [num_segments,
        out_size] vectors (1 + delta) in float32."""
        seg_row = torch.zeros(num_segments, dtype=torch.long, device=h.device)
        return generate_vectors(h, seg, seg_row, self.stacked())
