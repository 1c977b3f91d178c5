"""The worker's device adapter cache: a fixed number of rows of PEDRO generator weights,
stacked per layer, so that one prefill step runs every prefilling request's generator
together, whatever adapter each uses (generator.generate_vectors).

The rows are allocated once, at model load, and paid for out of the KV-cache budget
(worker.py); they never grow. Which adapter sits in which row is the scheduler's decision
(scheduler.DeviceRows): the worker writes the validated weights it is handed into the
row it is told, and reads no file."""

from __future__ import annotations

import torch

from ..config import RATIONAL_DEN_COEFFS, RATIONAL_NUM_COEFFS, BaseShapes
from ..generator import ACTIVATION_CODES, POOLER_CODES, StackedGenerators
from .layout import ShardLayout
from .store import AdapterWeights


class DeviceAdapterCache:
    WEIGHTS = ("pool_w", "down_w", "down_b", "rat_num", "rat_den", "up_w", "up_b")

    def __init__(self, base: BaseShapes, layout: ShardLayout, num_rows: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.base, self.layout, self.max_rank, self.num_rows = base, layout, max_rank, num_rows
        L, n, d, r, w = base.num_layers, num_rows, base.hidden_size, max_rank, layout.width
        shapes = dict(pool_w=(L, n, d), down_w=(L, n, r, d), down_b=(L, n, r), rat_num=(L, n, RATIONAL_NUM_COEFFS),
                      rat_den=(L, n, RATIONAL_DEN_COEFFS), up_w=(L, n, w, r), up_b=(L, n, w))
        for k, shape in shapes.items():
            setattr(self, k, torch.zeros(shape, dtype=dtype, device=device))
        self.pooler_code = torch.zeros(n, dtype=torch.long, device=device)
        self.act_code = torch.zeros(n, dtype=torch.long, device=device)
        self.columns = layout.columns()

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.WEIGHTS)

    @torch.no_grad()
    def write(self, row: int, w: AdapterWeights) -> None:
        """Row `row` holds adapter `w` from now on: its rank in the first r rank columns,
        this rank's shard of each of its targets in the slot row's columns, zeros (factor 1)
        for served targets it lacks."""
        config, r = w.config, w.config.r
        for k in self.WEIGHTS:
            getattr(self, k)[:, row].zero_()
        if w.pool_w is not None:
            self.pool_w[:, row].copy_(w.pool_w, non_blocking=True)
        self.down_w[:, row, :r].copy_(w.down_w, non_blocking=True)
        self.down_b[:, row, :r].copy_(w.down_b, non_blocking=True)
        if w.rat_num is not None:
            self.rat_num[:, row].copy_(w.rat_num, non_blocking=True)
            self.rat_den[:, row].copy_(w.rat_den, non_blocking=True)
        for t, (start, _) in config.target_columns().items():
            lo, hi = self.layout.full_range(t)  # this rank's shard of the target
            c = self.columns[t]
            self.up_w[:, row, c:c + hi - lo, :r].copy_(w.up_w[:, start + lo:start + hi], non_blocking=True)
            self.up_b[:, row, c:c + hi - lo].copy_(w.up_b[:, start + lo:start + hi], non_blocking=True)
        self.pooler_code[row] = POOLER_CODES[config.pooler]
        self.act_code[row] = ACTIVATION_CODES[config.activation]

    def layer(self, index: int, poolers: frozenset[str], activations: frozenset[str]) -> StackedGenerators:
        """Layer `index`'s rows, for a step whose prefills use these poolers and activations."""
        return StackedGenerators(
            down_w=self.down_w[index], down_b=self.down_b[index], up_w=self.up_w[index], up_b=self.up_b[index],
            pool_w=self.pool_w[index], rat_num=self.rat_num[index], rat_den=self.rat_den[index],
            pooler_code=self.pooler_code, act_code=self.act_code, poolers=poolers, activations=activations)
