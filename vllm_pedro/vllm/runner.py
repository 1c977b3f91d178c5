"""The worker side of PEDRO: per-step mapping from tokens to vector slots.

`PedroRuntime` owns the slots and the adapter cache of one worker. `PedroRunnerMixin`
is mixed into vLLM's model runner (GPUModelRunner or CPUModelRunner) by worker.py and
hooks three of its steps, the way the LoRA mixin hooks set_active_loras:
  load_model      -> wrap the decoder layers, allocate slots and the adapter cache
  _update_states  -> free the slots of finished and preempted requests
  _prepare_inputs -> build this step's token -> slot map and the prefill segments
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import BaseShapes
from .adapters import AdapterCache
from .args import PedroArgs
from .layers import set_runtime, wrap_model
from .layout import ShardLayout
from .slots import SlotPool

EXTRA_ARGS_KEY = "pedro"


@dataclass
class StepInfo:
    """The prefill work of one step (empty for decode-only steps and dummy runs)."""

    has_prefill: bool = False
    pool_token_idx: torch.Tensor | None = None  # [N] prompt tokens' rows in the flat batch
    pool_seg: torch.Tensor | None = None  # [N] which prefill request each belongs to
    seg_row: torch.Tensor | None = None  # [R] adapter cache row per prefill request
    seg_slot: torch.Tensor | None = None  # [R] vector slot per prefill request


NO_PREFILL = StepInfo()


def base_shapes_from_hf_config(hf_config) -> BaseShapes:
    text = getattr(hf_config, "text_config", hf_config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return BaseShapes(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                      q_size=heads * head_dim, kv_size=kv_heads * head_dim,
                      ff_size=text.intermediate_size)


class PedroRuntime:
    def __init__(self, runner, args: PedroArgs):
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        model = runner.get_model()
        layers = wrap_model(model)
        hf_config = runner.model_config.hf_config
        self.base = base_shapes_from_hf_config(hf_config)
        if len(layers) != self.base.num_layers:
            raise RuntimeError(f"found {len(layers)} decoder layers, config says {self.base.num_layers}")
        qkv = layers[0].self_attn.qkv_proj.base_layer
        tp_size = get_tensor_model_parallel_world_size()
        self.layout = ShardLayout(targets=args.targets, base=self.base, tp_rank=get_tensor_model_parallel_rank(),
                                  tp_size=tp_size, num_kv_heads_total=qkv.total_num_kv_heads,
                                  head_size=qkv.head_size)
        self.q_size, self.kv_size = qkv.num_heads * qkv.head_size, qkv.num_kv_heads * qkv.head_size
        self.columns = self.layout.columns()
        device, dtype = runner.device, runner.model_config.dtype
        self.slots = SlotPool(self.base.num_layers, runner.scheduler_config.max_num_seqs,
                              self.layout.width, dtype, device)
        self.adapters = AdapterCache(self.base, self.layout, args.max_adapters, args.max_rank, dtype, device)
        self.max_tokens = runner.max_num_tokens
        self.token_slot_np = np.full(self.max_tokens, -1, dtype=np.int32)
        self.token_slot = torch.full((self.max_tokens,), -1, dtype=torch.int32, device=device)
        self.step = NO_PREFILL
        self.device = device
        self.num_prefills = 0  # PEDRO prefills run (recomputed ones after preemption count again)
        set_runtime(self)

    @property
    def nbytes(self) -> int:
        """Device bytes that live beside the KV cache."""
        return self.slots.nbytes

    def free_unscheduled(self, scheduler_output) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.slots.release(req_id)
        # A running request is scheduled every step (chunked prefill is off for PEDRO and
        # the token budget covers max_num_seqs decodes), so one missing here was preempted:
        # its slot is freed now and refilled when its prefill is recomputed.
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id in [r for r in self.slots.owner if r not in scheduled]:
            self.slots.release(req_id)

    def prepare_step(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = np.concatenate([[0], np.cumsum(num_scheduled_tokens[:num_reqs])])
        token_slot = self.token_slot_np
        token_slot.fill(-1)
        prefills = []  # (start, num prompt tokens, slot, int_id)
        adapters = {}
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests[req_id]
            params = state.sampling_params
            info = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            if info is None:
                continue
            computed = int(batch.num_computed_tokens_cpu[i])
            n_sched = int(num_scheduled_tokens[i])
            prompt_len = state.num_prompt_tokens
            if computed == 0:
                if n_sched < prompt_len:
                    raise RuntimeError(
                        f"PEDRO request {req_id}: only {n_sched} of its {prompt_len} prompt tokens "
                        "were scheduled in one step; PEDRO needs the whole prompt in one prefill "
                        "(chunked prefill must stay disabled)")
                slot = self.slots.acquire(req_id)
                prefills.append((starts[i], prompt_len, slot, info["int_id"]))
                adapters[info["int_id"]] = (info["name"], info["path"])
            elif computed < prompt_len:
                raise RuntimeError(f"PEDRO request {req_id}: prefill resumed at token {computed} of "
                                   f"{prompt_len}; vectors need the whole prompt in one step")
            else:
                slot = self.slots.get(req_id)
                if slot is None:
                    raise RuntimeError(f"PEDRO request {req_id} is decoding without vectors")
            token_slot[starts[i]:starts[i] + n_sched] = slot
        self.token_slot.copy_(torch.from_numpy(token_slot), non_blocking=True)
        if not prefills:
            self.step = NO_PREFILL
            return
        rows = self.adapters.ensure(adapters)
        self.num_prefills += len(prefills)
        lens = np.array([p[1] for p in prefills])
        seg = np.repeat(np.arange(len(prefills)), lens)
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        tok = np.repeat(np.array([p[0] for p in prefills]), lens) + offsets
        to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device, non_blocking=True)
        self.step = StepInfo(True, to_dev(tok), to_dev(seg),
                             to_dev([rows[p[3]] for p in prefills]), to_dev([p[2] for p in prefills]))

    def end_step(self) -> None:
        self.step = NO_PREFILL


class PedroRunnerMixin:
    """Mixed in front of vLLM's model runner class by worker.py."""

    pedro: PedroRuntime | None = None

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self.pedro = PedroRuntime(self, PedroArgs.from_vllm_config(self.vllm_config))

    def _update_states(self, scheduler_output):
        out = super()._update_states(scheduler_output)
        self.pedro.free_unscheduled(scheduler_output)
        return out

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self.pedro.prepare_step(self, num_scheduled_tokens)
        return out

    def _model_forward(self, *args, **kwargs):
        try:
            return super()._model_forward(*args, **kwargs)
        finally:
            # Dummy and profiling runs go straight to _model_forward: no stale prefill.
            self.pedro.end_step()
