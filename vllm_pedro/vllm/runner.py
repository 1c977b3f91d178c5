"""The worker side of PEDRO: the per-step token -> slot map and the prefill segments.

`PedroRuntime` owns the vector slots and the device adapter cache of one worker.
`PedroRunnerMixin` is mixed into vLLM's model runner (GPUModelRunner or CPUModelRunner)
by worker.py and follows three of its steps (private hooks, listed in patches.REGISTER):
  load_model      -> wrap the decoder layers, allocate slots and adapter rows
  _update_states  -> free the slots of finished and preempted requests; apply the
                     scheduler's PedroStepPlan (row writes, slots of new prefills)
  _prepare_inputs -> this step's token -> slot map and the prefill segments

Decode-only steps cost array operations only: the per-request slot array is rebuilt
(from the slot dict, without a Python loop) only when the batch's requests changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from .. import ops
from ..config import BaseShapes
from .adapters import DeviceAdapterCache
from .args import PedroArgs
from .layers import set_runtime, traced_scaling, wrap_model
from .layout import ShardLayout
from .slots import SlotPool


@dataclass
class PrefillStep:
    """The PEDRO prefill work of one step (None for decode-only steps and dummy runs)."""

    token_idx: torch.Tensor  # [N] prompt tokens' rows in the flat batch
    seg: torch.Tensor  # [N] which prefill request each belongs to
    seg_row: torch.Tensor  # [R] device adapter row per prefill request
    seg_slot: torch.Tensor  # [R] vector slot per prefill request
    poolers: frozenset[str]
    activations: frozenset[str]


class PedroRuntime:
    def __init__(self, runner, args: PedroArgs):
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.base = BaseShapes.from_hf_config(runner.model_config.hf_config)
        layers = wrap_model(runner.get_model(), self)
        if len(layers) != self.base.num_layers:
            raise RuntimeError(f"found {len(layers)} decoder layers, config says {self.base.num_layers}")
        qkv = layers[0].self_attn.qkv_proj.base_layer
        self.layout = ShardLayout(targets=args.targets, base=self.base, tp_rank=get_tensor_model_parallel_rank(),
                                  tp_size=get_tensor_model_parallel_world_size(),
                                  num_kv_heads_total=qkv.total_num_kv_heads, head_size=qkv.head_size)
        self.q_size, self.kv_size = qkv.num_heads * qkv.head_size, qkv.num_kv_heads * qkv.head_size
        self.columns = self.layout.columns()
        device, dtype = runner.device, runner.model_config.dtype
        self.device = device
        self.ops = ops.backend(device)  # resolved once (VLLM_PEDRO_OPS_BACKEND read here)
        self.traced = traced_scaling(runner.vllm_config)
        self.slots = SlotPool(self.base.num_layers, runner.scheduler_config.max_num_seqs, self.layout.width,
                              dtype, device)
        self.adapters = DeviceAdapterCache(self.base, self.layout, args.max_adapters, args.max_rank, dtype, device)
        ones = self.slots.ones_row
        self.token_slot_np = np.full(runner.max_num_tokens, ones, dtype=np.int32)
        self.token_slot = torch.from_numpy(self.token_slot_np).to(device)  # static: CUDA graphs read it
        self._req_slots = np.full(runner.scheduler_config.max_num_seqs, ones, dtype=np.int32)
        self._batch_ids: list[str] = []
        self._num_sched = np.zeros(0, dtype=np.int32)
        self._num_tokens = 0
        self._plan = None
        self.step: PrefillStep | None = None
        self.num_prefills = 0  # PEDRO prefills run (recomputed ones after preemption count again)
        self.num_map_rebuilds = 0  # steps whose request -> slot array was rebuilt
        set_runtime(self)

    @property
    def nbytes(self) -> int:
        """Device bytes that live beside the KV cache: the slots and the adapter rows."""
        return self.slots.nbytes + self.adapters.nbytes

    def update_states(self, scheduler_output) -> None:
        """After vLLM's _update_states: slots of finished and preempted requests are free;
        the plan's rows are written and its prefills get slots."""
        for req_id in scheduler_output.finished_req_ids:
            self.slots.release(req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.slots.release(req_id)  # refilled when its prefill is recomputed
        plan = self._plan = getattr(scheduler_output, "pedro", None)
        if plan is not None:
            for row, weights in plan.loads.items():
                self.adapters.write(row, weights)
            for req_id in plan.prefills:
                self.slots.acquire(req_id)

    def prepare_step(self, batch, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's _prepare_inputs: the token -> slot map of this step (base tokens read
        the ones row) and, with prefills, their segments."""
        n = batch.num_reqs
        ids = batch.req_ids[:n]
        num_sched = num_scheduled_tokens[:n]
        plan, self._plan = self._plan, None
        if plan is not None or ids != self._batch_ids:  # requests joined, left or moved
            self._batch_ids = list(ids)
            self._req_slots[:n] = np.fromiter(map(self.slots.owner.get, ids, repeat(self.slots.ones_row)),
                                              dtype=np.int32, count=n)
            self.num_map_rebuilds += 1
        elif np.array_equal(num_sched, self._num_sched):
            self.step = None  # a decode step like the last one: the device map is current
            return
        self._num_sched = num_sched.copy()
        total = int(num_sched.sum())
        tokens = self.token_slot_np
        tokens[:total] = np.repeat(self._req_slots[:n], num_sched)
        tokens[total:self._num_tokens] = self.slots.ones_row  # padding and last step's tail
        self.token_slot[:max(total, self._num_tokens)].copy_(
            torch.from_numpy(tokens[:max(total, self._num_tokens)]), non_blocking=True)
        self._num_tokens = total
        self.step = None if plan is None else self._prefill_step(batch, plan, num_sched)

    def _prefill_step(self, batch, plan, num_sched: np.ndarray) -> PrefillStep:
        starts = np.concatenate([[0], np.cumsum(num_sched)])
        idx = np.array([batch.req_id_to_index[r] for r in plan.prefills], dtype=np.int64)
        rows = np.array([row for row, _ in plan.prefills.values()], dtype=np.int64)
        lens = np.array([plen for _, plen in plan.prefills.values()], dtype=np.int64)
        short = num_sched[idx] < lens
        if short.any():
            raise RuntimeError(f"PEDRO: {int(short.sum())} prompt(s) were not scheduled whole in one step; PEDRO "
                               "needs every prompt in one prefill (chunked prefill must stay off)")
        slots = np.array([self.slots.owner[r] for r in plan.prefills], dtype=np.int64)
        seg = np.repeat(np.arange(len(lens)), lens)
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        tok = np.repeat(starts[idx], lens) + offsets
        self.num_prefills += len(lens)
        dev = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        return PrefillStep(dev(tok), dev(seg), dev(rows), dev(slots), plan.poolers, plan.activations)

    def end_step(self) -> None:
        self.step = None


class PedroRunnerMixin:
    """Mixed in front of vLLM's model runner class by worker.py."""

    pedro: PedroRuntime | None = None

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self.pedro = PedroRuntime(self, PedroArgs.from_vllm_config(self.vllm_config))

    def _update_states(self, scheduler_output):
        out = super()._update_states(scheduler_output)
        self.pedro.update_states(scheduler_output)
        return out

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self.pedro.prepare_step(self.input_batch, num_scheduled_tokens)
        return out

    def _model_forward(self, *args, **kwargs):
        try:
            return super()._model_forward(*args, **kwargs)
        finally:
            # Dummy and profiling runs go straight to _model_forward: no stale prefill.
            self.pedro.end_step()
