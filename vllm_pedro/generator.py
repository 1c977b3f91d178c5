"""The PEDRO vector generator in pure torch: poolers, the rational activation, and
`VectorGenerator`, one per decoder layer.

Everything works on *ragged segments*: hidden states of many prompts flattened into
[N, d] plus a segment id per token. The transformers reference and the vLLM plugin
both call these functions, so the two cannot drift apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLER_CODES = {"attention": 0, "mean": 1, "last": 2}

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
    n, d = h.shape
    zeros = h.new_zeros(num_segments)
    counts = zeros.index_add(0, seg, torch.ones_like(seg, dtype=h.dtype))
    code = pooler_codes[seg]
    # Each pooler is a weighting of its segment's tokens; compute all three, pick per token.
    mean_w = 1.0 / counts[seg]
    last_idx = torch.full((num_segments,), -1, dtype=torch.long, device=h.device)
    last_idx = last_idx.scatter_reduce(0, seg, torch.arange(n, device=h.device), "amax")
    last_w = (torch.arange(n, device=h.device) == last_idx[seg]).to(h.dtype)
    weights = torch.where(code == POOLER_CODES["mean"], mean_w, last_w)
    if scores is not None:
        s = torch.where(code == POOLER_CODES["attention"], scores, torch.zeros_like(scores))
        smax = torch.full_like(zeros, float("-inf")).scatter_reduce(0, seg, s, "amax")
        e = torch.exp(s - smax[seg])
        att_w = e / zeros.index_add(0, seg, e)[seg]
        weights = torch.where(code == POOLER_CODES["attention"], att_w, weights)
    return h.new_zeros(num_segments, d).index_add(0, seg, weights.unsqueeze(-1) * h)


class VectorGenerator(nn.Module):
    """G_l: prompt hidden states -> 1 + delta, the scaling vectors of one layer.

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

    def act(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "rational":
            return rational(z, self.rat_num.float(), self.rat_den.float())
        return FIXED_ACTIVATIONS[self.activation](z)

    def forward(self, h: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
        """h: [N, d] prompt hidden states of all segments; seg: [N]. Returns [num_segments,
        out_size] vectors (1 + delta) in float32."""
        h = h.float()
        code = torch.full((num_segments,), POOLER_CODES[self.pooler], device=h.device)
        scores = h @ self.pool_w.float() if self.pooler == "attention" else None
        pooled = segment_pool(h, seg, num_segments, code, scores)
        z = self.act(F.linear(pooled, self.down.weight.float(), self.down.bias.float()))
        return 1.0 + F.linear(z, self.up.weight.float(), self.up.bias.float())
