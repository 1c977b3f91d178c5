"""The prefill generator inside vLLM: per layer, every PEDRO prompt of a step through its
adapter's generator, 1 + delta written into its vector slot.

The math is generator.generate_vectors' (the transformers reference and training run that
one; tests hold this against it), arranged for a step's flat batch:
  - a prompt is a span of the flat batch (vLLM lays each request's tokens out
    contiguously), so one ops.pool_prompts call pools them all where they lie: no gather
    of the hidden states, one pass over each prompt's tokens (C++ on the CPU, Triton on
    a GPU);
  - the step lists its prompts grouped by adapter row, so the down and up projections
    are one matmul per row present, against views of that row's weights in the adapter
    cache: no per-prompt copies of W_down / W_up, and no work for rows no prompt uses.
The groups are host data of the step: nothing here reads a device value.

Pure torch and vllm_pedro.ops (no vLLM import): the plugin's runner builds the steps and
layers.pedro_prefill calls write_vectors; tests and benchmarks use both directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .generator import StackedGenerators, activate, rational_horner


@dataclass
class PrefillStep:
    """The PEDRO prefill work of one step: its prompts as spans of the flat batch, grouped
    by adapter row."""

    starts: torch.Tensor  # [S] int64 first token of each prompt in the flat batch
    lengths: torch.Tensor  # [S] int64 prompt length (a recomputed request's outputs excluded)
    rows: torch.Tensor  # [S] int64 device adapter row, non-decreasing
    slots: torch.Tensor  # [S] int64 vector slot
    num_tokens: int  # sum of lengths (host: sizes arrays without a device sync)
    groups: tuple[tuple[int, int, int], ...]  # (row, first, end): prompts [first, end) use that row
    poolers: frozenset[str]  # the kinds among the rows used (generator.StackedGenerators)
    activations: frozenset[str]

    @classmethod
    def from_host(cls, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray, slots: np.ndarray,
                  poolers: frozenset[str], activations: frozenset[str], device) -> PrefillStep:
        """From per-prompt host arrays in any order: sorted by row (stable), sent to `device`."""
        order = np.argsort(rows, kind="stable")
        starts, lengths, rows, slots = (np.asarray(a, dtype=np.int64)[order] for a in (starts, lengths, rows, slots))
        cuts = [0, *(np.flatnonzero(np.diff(rows)) + 1).tolist(), len(rows)]
        groups = tuple((int(rows[lo]), lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]))
        dev = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        return cls(dev(starts), dev(lengths), dev(rows), dev(slots), int(lengths.sum()), groups,
                   frozenset(poolers), frozenset(activations))


def write_vectors(vectors: torch.Tensor, x: torch.Tensor, step: PrefillStep, g: StackedGenerators,
                  pool: Callable) -> None:
    """vectors: one layer's slots [num_slots, W]; x: the layer's flat hidden states [T, d]
    (input norm applied); g: the layer's adapter rows; pool: an ops pool_prompts
    implementation (the runtime's resolved backend, ops.Backend.pool_prompts)."""
    pool_w = g.pool_w if "attention" in step.poolers else None
    pooled = pool(x, step.starts, step.lengths, step.rows, g.pooler_code, pool_w, step.num_tokens,
                  torch.empty(step.rows.shape[0], x.shape[1], dtype=torch.float32, device=x.device))
    vectors.index_copy_(0, step.slots, project(pooled, step, g).to(vectors.dtype))


def project(pooled: torch.Tensor, step: PrefillStep, g: StackedGenerators) -> torch.Tensor:
    """1 + W_up act(W_down h + b_down) + b_up for each prompt's pooled h [S, d] (float32),
    one matmul per adapter row present. Returns [S, W] float32."""
    S = pooled.shape[0]
    z = pooled.new_empty(S, g.down_w.shape[1])
    for row, lo, hi in step.groups:
        torch.addmm(g.down_b[row].float(), pooled[lo:hi], g.down_w[row].float().T, out=z[lo:hi])
    a = activate(z, g, step.rows, rational_horner)
    vec = pooled.new_empty(S, g.up_w.shape[1])
    for row, lo, hi in step.groups:  # the 1 of 1 + delta folded into the bias: no pass over vec
        torch.addmm(g.up_b[row].float() + 1.0, a[lo:hi], g.up_w[row].float().T, out=vec[lo:hi])
    return vec
