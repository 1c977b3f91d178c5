"""The worker side of PEDRO: the per-step token -> slot map and the prefill spans.

`PedroRuntime` owns the vector slots and the device adapter cache of one worker.
`PedroRunnerMixin` is mixed into vLLM's model runner (GPUModelRunner or CPUModelRunner)
by worker.py and follows three of its steps (private hooks, listed in patches.REGISTER):
  load_model      -> refuse an unsupported family (families.py), wrap the decoder layers,
                     allocate slots and adapter rows
  _update_states  -> free the slots of finished and preempted requests; apply the
                     scheduler's PedroStepPlan (row writes, slots of new prefills)
  _prepare_inputs -> this step's token -> slot map and the prefill spans (prefill.PrefillStep)

Decode-only steps cost array operations only (StepMap).
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import torch

from .. import ops
from ..config import BaseShapes
from ..families import Family, architecture_of_config, check_targets
from ..prefill import PrefillStep
from .adapters import DeviceAdapterCache
from .args import PedroArgs
from .layers import real_linear, scaling_mode, set_runtime, wrap_model
from .layout import ShardLayout
from .slots import SlotPool


class StepMap:
    """Which slot row each token of a step reads, and the step's prefill spans.

    A request's slot is kept in a dict from its prefill until it finishes or is preempted
    (vLLM keeps request_lora_mapping the same way); the per-request slot array in batch
    order is rebuilt, with one C-level pass over the dict, only when the batch's requests
    joined, left or moved. A decode step whose batch is the last step's does nothing: the
    device map is already right."""

    def __init__(self, slots: SlotPool, max_tokens: int, max_reqs: int, device):
        self.slots, self.device = slots, device
        ones = slots.ones_row
        self.token_slot_np = np.full(max_tokens, ones, dtype=np.int32)
        self.token_slot = torch.from_numpy(self.token_slot_np).to(device)  # static: CUDA graphs read it
        self._req_slots = np.full(max_reqs, ones, dtype=np.int32)
        self._batch_ids: list[str] = []
        self._num_sched = np.zeros(0, dtype=np.int32)
        self._num_tokens = 0
        self.num_rebuilds = 0  # steps whose request -> slot array was rebuilt (tests read it)

    def update(self, finished, preempted, prefills) -> None:
        """Slots of finished and preempted requests are free; prefilling requests get one."""
        for req_id in finished:
            self.slots.release(req_id)
        for req_id in preempted or ():
            self.slots.release(req_id)  # refilled when its prefill is recomputed
        for req_id in prefills:
            self.slots.acquire(req_id)

    def prepare(self, ids: list[str], req_id_to_index: dict[str, int], num_sched: np.ndarray,
                plan) -> PrefillStep | None:
        """ids: the batch's request ids in order; num_sched: their scheduled tokens."""
        n = len(ids)
        if plan is not None or ids != self._batch_ids:  # requests joined, left or moved
            self._batch_ids = list(ids)
            self._req_slots[:n] = np.fromiter(map(self.slots.owner.get, ids, repeat(self.slots.ones_row)),
                                              dtype=np.int32, count=n)
            self.num_rebuilds += 1
        elif np.array_equal(num_sched, self._num_sched):
            return None  # a decode step like the last one: the device map is current
        self._num_sched = num_sched.copy()
        total = int(num_sched.sum())
        tokens = self.token_slot_np
        tokens[:total] = np.repeat(self._req_slots[:n], num_sched)
        tokens[total:self._num_tokens] = self.slots.ones_row  # padding and last step's tail
        upto = max(total, self._num_tokens)
        self.token_slot[:upto].copy_(torch.from_numpy(tokens[:upto]), non_blocking=True)
        self._num_tokens = total
        return None if plan is None else self._prefill_step(req_id_to_index, plan, num_sched)

    def _prefill_step(self, req_id_to_index, plan, num_sched: np.ndarray) -> PrefillStep:
        offsets = np.concatenate([[0], np.cumsum(num_sched)])  # each request's first token in the flat batch
        idx = np.array([req_id_to_index[r] for r in plan.prefills], dtype=np.int64)
        rows = np.array([row for row, _ in plan.prefills.values()], dtype=np.int64)
        lens = np.array([plen for _, plen in plan.prefills.values()], dtype=np.int64)
        short = num_sched[idx] < lens
        if short.any():
            raise RuntimeError(f"PEDRO: {int(short.sum())} prompt(s) were not scheduled whole in one step; the PEDRO "
                               "scheduler admits a PEDRO prompt only with room for all of it (scheduler.step_room)")
        slots = np.array([self.slots.owner[r] for r in plan.prefills], dtype=np.int64)
        return PrefillStep.from_host(offsets[idx], lens, rows, slots, plan.poolers, plan.activations, self.device)


def check_family(hf_config, args: PedroArgs) -> Family:
    """The gate where the engine starts: a class outside families.SUPPORTED, or `up` served
    on a mixture-of-experts model, stops it, naming what is supported."""
    return check_targets(architecture_of_config(hf_config), args.targets)


class PedroRuntime:
    def __init__(self, runner, args: PedroArgs):
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.linear import QKVParallelLinear

        family = check_family(runner.model_config.hf_config, args)
        self.base = BaseShapes.from_hf_config(runner.model_config.hf_config)
        layers = wrap_model(runner.get_model(), self, with_up=not family.moe)
        if len(layers) != self.base.num_layers:
            raise RuntimeError(f"found {len(layers)} decoder layers, config says {self.base.num_layers}")
        qkv = real_linear(layers[0].self_attn.qkv_proj, QKVParallelLinear)
        self.layout = ShardLayout(targets=args.targets, base=self.base, tp_rank=get_tensor_model_parallel_rank(),
                                  tp_size=get_tensor_model_parallel_world_size(),
                                  num_kv_heads_total=qkv.total_num_kv_heads, head_size=qkv.head_size)
        if self.layout.qkv_width != (qkv.num_heads + 2 * qkv.num_kv_heads) * qkv.head_size:
            raise RuntimeError(f"PEDRO's slot layout ({self.layout.qkv_width} qkv columns) does not match this rank's "
                               f"fused qkv output ({qkv.num_heads} q and {qkv.num_kv_heads} kv heads of {qkv.head_size})")
        self.columns = self.layout.columns()
        device, dtype = runner.device, runner.model_config.dtype
        self.ops = ops.backend(device)  # resolved once (VLLM_PEDRO_OPS_BACKEND read here)
        # On the CPU, the C++ in-place gather-multiply (skips base tokens), when it builds and
        # the torch backend is not asked for explicitly.
        self.cpu_scale = ops.cpu.scale_rows_ if self.ops.pool == "cpu" else None
        self.mode = scaling_mode(runner.vllm_config, self.cpu_scale is not None)  # layers.py
        max_reqs = runner.scheduler_config.max_num_seqs
        self.slots = SlotPool(self.base.num_layers, max_reqs, self.layout.width, dtype, device)
        self.adapters = DeviceAdapterCache(self.base, self.layout, args.max_adapters, args.max_rank, dtype, device)
        self.map = StepMap(self.slots, runner.max_num_tokens, max_reqs, device)
        self.token_slot = self.map.token_slot
        self._plan = None
        self.step: PrefillStep | None = None
        self.num_prefills = 0  # PEDRO prefills run (recomputed ones after preemption count again)
        set_runtime(self)

    def scale_(self, x, layer: int, col: int) -> None:
        """Eager mode: x *= this layer's vector columns [col, col + width) of each token's slot
        (col < 0: the target is not served, nothing to do)."""
        if col < 0:
            return
        if self.cpu_scale is not None:
            self.cpu_scale(x, self.slots.vectors[layer], self.token_slot, col, self.slots.ones_row)
        else:
            self.ops.scale_(x, self.slots.vectors[layer], self.token_slot, col)

    @property
    def nbytes(self) -> int:
        """Device bytes that live beside the KV cache: the slots and the adapter rows."""
        return self.slots.nbytes + self.adapters.nbytes

    def update_states(self, scheduler_output) -> None:
        """After vLLM's _update_states: the plan's rows are written, slots follow requests."""
        plan = self._plan = getattr(scheduler_output, "pedro", None)
        if plan is not None:
            for row, weights in plan.loads.items():
                self.adapters.write(row, weights)
        self.map.update(scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids,
                        plan.prefills if plan is not None else ())

    def prepare_step(self, batch, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's _prepare_inputs: this step's token -> slot map and prefill spans."""
        n = batch.num_reqs
        plan, self._plan = self._plan, None
        self.step = self.map.prepare(batch.req_ids[:n], batch.req_id_to_index, num_scheduled_tokens[:n], plan)
        if self.step is not None:
            self.num_prefills += len(plan.prefills)

    def end_step(self) -> None:
        self.step = None


class PedroRunnerMixin:
    """Mixed in front of vLLM's model runner class by worker.py."""

    pedro: PedroRuntime | None = None

    def load_model(self, *args, **kwargs):
        pedro_args = PedroArgs.from_vllm_config(self.vllm_config)
        check_family(self.model_config.hf_config, pedro_args)  # before the weights are loaded
        if self.lora_config is not None and self.device.type == "cpu":
            from .patches import enable_pedro_lora

            enable_pedro_lora()  # base and PEDRO tokens in a LoRA batch stay exact (patches.REGISTER)
        super().load_model(*args, **kwargs)
        self.pedro = PedroRuntime(self, pedro_args)

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
