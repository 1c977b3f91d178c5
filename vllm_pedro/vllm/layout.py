"""Where each target's vector lives: in the server-wide slot row, and in this rank's
shard of the q/k/v and FFN-up activations under tensor parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TARGETS, BaseShapes


@dataclass(frozen=True)
class ShardLayout:
    """One rank's view. A slot row holds [q | k | v | up], each only this rank's shard, so
    vectors are sharded exactly like the column-parallel q/k/v/up outputs they scale."""

    targets: tuple[str, ...]
    base: BaseShapes
    tp_rank: int = 0
    tp_size: int = 1
    num_kv_heads_total: int = 1
    head_size: int = 1

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def q_shard(self) -> int:
        return self.base.q_size // self.tp_size

    @property
    def kv_shard(self) -> int:
        # Fewer KV heads than ranks: each rank holds one (replicated) head.
        return max(self.num_kv_heads_total // self.tp_size, 1) * self.head_size

    @property
    def ff_shard(self) -> int:
        return self.base.ff_size // self.tp_size

    def shard_width(self, target: str) -> int:
        return {"q": self.q_shard, "k": self.kv_shard, "v": self.kv_shard, "up": self.ff_shard}[target]

    def full_range(self, target: str) -> tuple[int, int]:
        """The [start, end) of this rank's shard inside the full (unsharded) target."""
        if target == "q":
            return self.tp_rank * self.q_shard, (self.tp_rank + 1) * self.q_shard
        if target == "up":
            return self.tp_rank * self.ff_shard, (self.tp_rank + 1) * self.ff_shard
        replicas = max(self.tp_size // self.num_kv_heads_total, 1)
        start = (self.tp_rank // replicas) * self.kv_shard
        return start, start + self.kv_shard

    def columns(self) -> dict[str, int]:
        """target -> first column in this rank's slot row (-1 for up when it is not served).

        The row starts with a full [q | k | v] block laid out like this rank's fused qkv
        output, whatever is targeted (an adapter's untargeted part has W_up = b_up = 0
        there: factor 1), so the decode scaling of qkv is one elementwise product with no
        ranges, which torch.compile fuses into the rotary embedding cleanly; up follows."""
        q, kv = self.q_shard, self.kv_shard
        return {"q": 0, "k": q, "v": q + kv, "up": q + 2 * kv if "up" in self.targets else -1}

    @property
    def qkv_width(self) -> int:
        return self.q_shard + 2 * self.kv_shard

    @property
    def width(self) -> int:
        return self.qkv_width + (self.ff_shard if "up" in self.targets else 0)
