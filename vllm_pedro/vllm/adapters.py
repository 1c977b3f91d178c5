"""The worker's adapter cache: up to N PEDRO adapters resident on the device, stacked
per layer so that one prefill step runs every request's generator together, whatever
adapter each uses.

Adapters are only read at prefill (decoding reads the slots), so an adapter is pinned
only while a prefill in the current step needs it; otherwise the least recently used
one is evicted. If one step needs more distinct adapters than N, the cache grows for
that step and says so in the log."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..adapter_io import load_adapter
from ..config import ACTIVATIONS, AdapterError, BaseShapes, PedroConfig
from ..generator import POOLER_CODES, rational, segment_pool
from .layout import ShardLayout

logger = logging.getLogger("vllm_pedro")
ACT_CODES = {a: i for i, a in enumerate(ACTIVATIONS)}


class AdapterCache:
    def __init__(self, base: BaseShapes, layout: ShardLayout, capacity: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.base, self.layout, self.max_rank = base, layout, max_rank
        self.dtype, self.device = dtype, device
        self.capacity = capacity
        self.index: OrderedDict[int, int] = OrderedDict()  # adapter int_id -> row, LRU order
        self.names: dict[int, str] = {}
        self._alloc(capacity)

    WEIGHTS = ("pool_w", "down_w", "down_b", "rat_num", "rat_den", "up_w", "up_b")

    def _alloc(self, n: int) -> None:
        """(Re)allocate n adapter rows per layer, keeping the rows there are."""
        L, d, r, w = self.base.num_layers, self.base.hidden_size, self.max_rank, self.layout.width
        shapes = dict(pool_w=(L, n, d), down_w=(L, n, r, d), down_b=(L, n, r), rat_num=(L, n, 7),
                      rat_den=(L, n, 5), up_w=(L, n, w, r), up_b=(L, n, w))
        for k, shape in shapes.items():
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if hasattr(self, k):
                new[:, :self.rows] = getattr(self, k)
            setattr(self, k, new)
        for k in ("pooler_code", "act_code"):
            new = torch.zeros(n, dtype=torch.long, device=self.device)
            if hasattr(self, k):
                new[:self.rows] = getattr(self, k)
            setattr(self, k, new)
        self.rows = n

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.WEIGHTS)

    def ensure(self, adapters: dict[int, tuple[str, str]]) -> dict[int, int]:
        """Make every adapter of this step resident. adapters: int_id -> (name, path).
        Returns int_id -> row."""
        needed = set(adapters)
        for int_id in needed:
            if int_id in self.index:
                self.index.move_to_end(int_id)
        missing = [i for i in adapters if i not in self.index]
        for int_id in missing:
            row = self._free_row(needed)
            name, path = adapters[int_id]
            self._load(row, path)
            self.index[int_id] = row
            self.names[int_id] = name
        return {i: self.index[i] for i in adapters}

    def _free_row(self, pinned: set[int]) -> int:
        used = set(self.index.values())
        for row in range(self.rows):
            if row not in used:
                return row
        if len(self.index) >= self.capacity:
            for int_id in self.index:  # least recently used first
                if int_id not in pinned:
                    row = self.index.pop(int_id)
                    logger.info("PEDRO: evicted adapter %s from the device cache", self.names.pop(int_id))
                    return row
        logger.warning("PEDRO: one step needs more than max_pedro_adapters=%d adapters; "
                       "growing the device adapter cache to %d", self.capacity, self.rows + 1)
        self._alloc(self.rows + 1)
        return self.rows - 1

    def remove(self, int_id: int) -> None:
        if self.index.pop(int_id, None) is not None:
            self.names.pop(int_id, None)

    def _load(self, row: int, path: str) -> None:
        config, tensors = load_adapter(path, base=self.base)
        self._check_fits(config)
        L, lay = self.base.num_layers, self.layout
        cols = config.target_columns()
        slot_cols = lay.columns()
        with torch.no_grad():
            for k in self.WEIGHTS:
                getattr(self, k)[:, row].zero_()
            for l in range(L):
                g = lambda name: tensors[f"generators.{l}.{name}"].to(self.device, self.dtype)
                if config.pooler == "attention":
                    self.pool_w[l, row] = g("pool_w")
                self.down_w[l, row, :config.r] = g("down.weight")
                self.down_b[l, row, :config.r] = g("down.bias")
                if config.activation == "rational":
                    self.rat_num[l, row] = g("rat_num")
                    self.rat_den[l, row] = g("rat_den")
                up_w, up_b = g("up.weight"), g("up.bias")
                for t, (start, _) in cols.items():
                    lo, hi = lay.full_range(t)  # this rank's shard of the target
                    c = slot_cols[t]
                    self.up_w[l, row, c:c + hi - lo, :config.r] = up_w[start + lo:start + hi]
                    self.up_b[l, row, c:c + hi - lo] = up_b[start + lo:start + hi]
            self.pooler_code[row] = POOLER_CODES[config.pooler]
            self.act_code[row] = ACT_CODES[config.activation]

    def _check_fits(self, config: PedroConfig) -> None:
        if config.r > self.max_rank:
            raise AdapterError(f"adapter rank {config.r} exceeds max_pedro_rank={self.max_rank}")
        extra = [t for t in config.targets if t not in self.layout.targets]
        if extra:
            raise AdapterError(f"adapter targets {extra} are not served (pedro_targets="
                               f"{list(self.layout.targets)})")

    def compute_vectors(self, layer: int, h: torch.Tensor, seg: torch.Tensor,
                        seg_row: torch.Tensor) -> torch.Tensor:
        """All prefill requests of a step at once. h: [N, d] prompt hidden states; seg: [N]
        request (segment) index; seg_row: [R] adapter row per request. Returns the
        [R, width] vectors (1 + delta) in float32."""
        h = h.float()
        tok_row = seg_row[seg]
        # Attention-pooler logits against every resident adapter, then pick each token's.
        scores = (h @ self.pool_w[layer].float().T).gather(1, tok_row.unsqueeze(1)).squeeze(1)
        pooled = segment_pool(h, seg, seg_row.shape[0], self.pooler_code[seg_row], scores)
        z = torch.einsum("rd,rkd->rk", pooled, self.down_w[layer, seg_row].float())
        z = z + self.down_b[layer, seg_row].float()
        code = self.act_code[seg_row].unsqueeze(1)
        a = rational(z, self.rat_num[layer, seg_row].float(), self.rat_den[layer, seg_row].float())
        for name, fn in (("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu)):
            a = torch.where(code == ACT_CODES[name], fn(z), a)
        delta = torch.einsum("rk,rwk->rw", a, self.up_w[layer, seg_row].float())
        return 1.0 + delta + self.up_b[layer, seg_row].float()
