"""Vector slots beside the KV cache: one row per running PEDRO request and layer, written
at prefill and read by every decoding step.

The buffer is allocated once, at model load, in the model dtype: [layers, slots + 1, width].
The last row is all ones and never handed out: base-model tokens point at it, so the
decode scaling is one gather-multiply for every token, with no mask. Its bytes come out
of the KV-cache budget (worker.py). A request holds a slot from its prefill until it
finishes or is preempted; a preempted request gets a slot again when its prefill is
recomputed."""

from __future__ import annotations

import torch


class SlotPool:
    def __init__(self, num_layers: int, num_slots: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        self.vectors = torch.ones(num_layers, num_slots + 1, width, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.ones_row = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.owner: dict[str, int] = {}  # request id -> slot

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    @property
    def num_used(self) -> int:
        return len(self.owner)

    def acquire(self, req_id: str) -> int:
        slot = self.owner.get(req_id)
        if slot is not None:  # re-prefill after preemption: reuse its row
            return slot
        if not self._free:
            raise RuntimeError(
                f"PEDRO vector slots exhausted ({self.num_slots} slots for {self.num_used} "
                f"requests); this means more PEDRO requests run at once than max_num_seqs")
        slot = self._free.pop()
        self.owner[req_id] = slot
        return slot

    def release(self, req_id: str) -> None:
        slot = self.owner.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)

    def layer(self, index: int) -> torch.Tensor:
        return self.vectors[index]
