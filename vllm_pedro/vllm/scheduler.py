"""The PEDRO scheduler: vLLM's scheduler (named by `scheduler_cls`, a public option) plus
the lifetimes of PEDRO adapters, in the engine core.

* A PEDRO request's adapter is wanted from the host store when the request arrives, so
  it is read on a loader thread while the request waits; the request is scheduled only
  once its adapter is READY (the rest of the batch does not wait for it).
* One step prefills PEDRO prompts of at most `max_pedro_adapters` distinct adapters, the
  rows of the worker's device cache (further prefills wait a step, as vLLM's scheduler
  does for `max_loras`). Decoding requests need no row: any number of tenants decode.
* The scheduler owns the device rows: it picks a row for each adapter of the step (least
  recently used out) and hands the worker a `PedroStepPlan` on the scheduler output: the
  rows of the step's prefills and the validated weights of rows to (re)fill. The worker
  reads no file and decides nothing.
* A PEDRO prompt is prefilled whole, in one step (its vectors come from all of it), while
  vLLM's chunked prefill stays on for everything else: a PEDRO prompt is admitted only in a
  step with room left for all of it, and otherwise waits while the requests behind it go
  ahead. So that it cannot starve, a PEDRO prompt passed over RESERVE_AFTER steps in a row
  holds the queue as vLLM's first-come-first-served order would: nothing behind it is
  admitted until it fits (running requests keep going and drain the room it needs). A
  PEDRO prompt longer than any step can hold fails alone, naming both numbers.
* A request whose adapter cannot be served fails alone: finish reason "error", the reason
  (naming the adapter) as its stop_reason; the engine goes on.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import RequestStatus

from ..config import BaseShapes
from .args import PedroArgs
from .metrics import SnapshotWriter, TenantCounter
from .request import ERROR_PREFIX, PedroRequest, pedro_request_of
from .store import AdapterWeights, HostAdapterStore, State, default_capacity

logger = logging.getLogger("vllm_pedro")
RESERVE_AFTER = 8  # steps a PEDRO prompt lets later requests pass before it holds the queue
STEP_LOCALS = {"token_budget", "input_budget", "draft_slots", "long_prefill_token_threshold"}


def step_room() -> int:
    """The tokens the step being scheduled can still give the waiting request vLLM is
    looking at: Scheduler.schedule's own `min(token_budget, input_budget - draft_slots)`,
    capped by its long-prefill threshold, read from its frame (patches.REGISTER
    "scheduler_step_budget"; the hook that calls this is called from schedule itself)."""
    frame = sys._getframe(2)  # step_room <- _handle_blocked_waiting_request <- Scheduler.schedule
    local = frame.f_locals
    if frame.f_code.co_name != "schedule" or not STEP_LOCALS <= local.keys():
        raise RuntimeError(f"PEDRO: the waiting-request hook was called from {frame.f_code.co_name}, not from "
                           "Scheduler.schedule with its step budget (see patches.REGISTER)")
    room = min(local["token_budget"], local["input_budget"] - local["draft_slots"])
    threshold = local["long_prefill_token_threshold"]
    return min(room, threshold) if threshold > 0 else room


@dataclass
class PedroStepPlan:
    """What the worker does for PEDRO in one step (attached as scheduler_output.pedro)."""

    prefills: dict[str, tuple[int, int]] = field(default_factory=dict)  # req_id -> (row, prompt tokens)
    loads: dict[int, AdapterWeights] = field(default_factory=dict)  # row -> weights to write first
    poolers: frozenset[str] = frozenset()  # of the rows the step's prefills use
    activations: frozenset[str] = frozenset()


class DeviceRows:
    """The scheduler's map of the worker's device adapter cache: adapter digest -> row,
    least recently used first."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.row_of: OrderedDict[str, int] = OrderedDict()

    def assign(self, keys: list[str]) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """Rows for the distinct `keys` of one step (at most num_rows). Returns key -> row and
        the (key, row) pairs whose row must be (re)filled."""
        assert len(keys) <= self.num_rows, (len(keys), self.num_rows)
        for k in keys:
            if k in self.row_of:
                self.row_of.move_to_end(k)
        fills = []
        wanted = set(keys)
        for k in keys:
            if k in self.row_of:
                continue
            if len(self.row_of) < self.num_rows:
                used = set(self.row_of.values())
                row = next(r for r in range(self.num_rows) if r not in used)
            else:
                victim = next(v for v in self.row_of if v not in wanted)
                row = self.row_of.pop(victim)
            self.row_of[k] = row
            fills.append((k, row))
        return {k: self.row_of[k] for k in keys}, fills


class PedroSchedulerMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pedro_args = PedroArgs.from_vllm_config(self.vllm_config)
        model_config = self.vllm_config.model_config
        base = BaseShapes.from_hf_config(model_config.hf_config)
        capacity = self.pedro_args.max_cpu_adapters or max(
            self.pedro_args.max_adapters, default_capacity(base, self.pedro_args.max_rank, model_config.dtype))
        pin = self.vllm_config.device_config.device_type == "cuda"
        self.pedro_store = HostAdapterStore(base, self.pedro_args, model_config.dtype, capacity, pin=pin)
        self.pedro_rows = DeviceRows(self.pedro_args.max_adapters)
        self.pedro_requests: dict[str, PedroRequest] = {}  # unfinished PEDRO requests
        self._pedro_pinned: set[str] = set()  # requests whose adapter is pinned until their prefill
        self._pedro_failed: dict[str, str] = {}  # req_id -> message, finished at the next output
        self._pedro_step_keys: set[str] = set()
        self._pedro_passed_over: dict[str, int] = {}  # req_id -> steps in a row it waited for room
        self._pedro_holding: str | None = None  # the PEDRO request holding this step's queue
        self.pedro_max_rows_in_step = 0  # the most device rows one step's prefills used (tests read it)
        sc = self.vllm_config.scheduler_config
        threshold = sc.long_prefill_token_threshold if sc.enable_chunked_prefill else 0
        # The most prompt tokens one step can prefill for a PEDRO request.
        self.pedro_max_prompt = min(self.max_num_scheduled_tokens, sc.max_num_batched_tokens,
                                    *([threshold] if threshold > 0 else []))
        self._pedro_waiting_for_adapter: set[str] = set()
        self._pedro_finished: dict[str, int] = {}  # finish reason -> PEDRO requests
        self._pedro_tenants = TenantCounter(self.pedro_args.metrics_tenant_labels)
        self._pedro_metrics = SnapshotWriter(self.pedro_args.stats_path, self.pedro_snapshot) \
            if self.pedro_args.stats_path else None
        logger.info("PEDRO: host adapter store of %d adapters%s, %d device rows", capacity,
                    " (pinned memory)" if pin else "", self.pedro_args.max_adapters)

    def pedro_snapshot(self) -> dict:
        """PEDRO's numbers for /metrics (metrics.py), read by the snapshot thread: each value
        is a counter or a length read in one step, so no lock of the scheduler is needed."""
        store = self.pedro_store
        with store._lock:
            st = store.stats
            snap = {"store_adapters": store.num_resident, "store_capacity": store.capacity,
                    "store_hits": st.hits, "store_misses": st.misses, "disk_reads": st.disk_reads,
                    "evictions": st.evictions, "failures": dict(st.failures_by_cause),
                    "load_seconds": st.load_hist.to_dict()}
        snap.update(device_rows_used=len(self.pedro_rows.row_of), device_rows=self.pedro_rows.num_rows,
                    waiting_for_adapter=len(self._pedro_waiting_for_adapter), running=len(self.pedro_requests),
                    finished=dict(self._pedro_finished), tenants=dict(self._pedro_tenants.counts))
        return snap

    # -- arrivals and departures ------------------------------------------------------------
    def add_request(self, request) -> None:
        try:
            ref = pedro_request_of(request.sampling_params)
        except ValueError as e:
            ref = None
            self._pedro_failed[request.request_id] = f"{ERROR_PREFIX}: {e}"
        if ref is not None:
            self.pedro_requests[request.request_id] = ref
            if request.num_prompt_tokens > self.pedro_max_prompt:
                self._pedro_failed[request.request_id] = (
                    f"{ERROR_PREFIX} {ref.name!r}: the prompt has {request.num_prompt_tokens} tokens, more than one "
                    f"step can prefill ({self.pedro_max_prompt} tokens: max_num_batched_tokens"
                    f"{', long_prefill_token_threshold' if self.pedro_max_prompt < self.max_num_scheduled_tokens else ''}"
                    f"); a PEDRO prompt is prefilled in one step. Shorten the prompt or raise --max-num-batched-tokens")
            else:
                # The read starts now, while the request waits.
                if self._want(request.request_id, ref, arrival=True).state is not State.READY:
                    self._pedro_waiting_for_adapter.add(request.request_id)
            self._pedro_tenants.add(ref.name)
        super().add_request(request)

    def _free_request(self, request, *args, **kwargs):
        """Every finished request passes here (private hook, patches.REGISTER)."""
        req_id = request.request_id
        if req_id in self.pedro_requests:
            reason = str(request.get_finished_reason())
            self._pedro_finished[reason] = self._pedro_finished.get(reason, 0) + 1
            self._forget(req_id)
        return super()._free_request(request, *args, **kwargs)

    def _want(self, req_id: str, ref: PedroRequest, arrival: bool = False):
        pin = req_id not in self._pedro_pinned
        if pin:
            self._pedro_pinned.add(req_id)
        return self.pedro_store.want(ref, pin=pin, arrival=arrival)

    def _unpin(self, req_id: str) -> None:
        if req_id in self._pedro_pinned:
            self._pedro_pinned.discard(req_id)
            self.pedro_store.release(self.pedro_requests[req_id])

    def _forget(self, req_id: str) -> None:
        self._pedro_passed_over.pop(req_id, None)
        self._pedro_waiting_for_adapter.discard(req_id)
        if req_id in self.pedro_requests:
            self._unpin(req_id)
            del self.pedro_requests[req_id]

    # -- scheduling -------------------------------------------------------------------------
    def _handle_blocked_waiting_request(self, request) -> bool:
        """vLLM asks this of every waiting request it is about to schedule (private hook,
        patches.REGISTER): False keeps it waiting this step."""
        if not super()._handle_blocked_waiting_request(request):
            return False
        req_id = request.request_id
        if req_id in self._pedro_failed:
            return False
        if self._pedro_holding is not None:
            return False  # behind a PEDRO prompt that waited long enough for room
        ref = self.pedro_requests.get(req_id)
        if ref is None:
            return True
        entry = self._want(req_id, ref)
        if entry.state is State.FAILED:
            self._pedro_failed[req_id] = f"{ERROR_PREFIX} {ref.name!r}: {entry.error}"
            self._pedro_waiting_for_adapter.discard(req_id)
            return False
        if entry.state is not State.READY:
            return False  # loading, or waiting for room in the store
        self._pedro_waiting_for_adapter.discard(req_id)
        key = ref.digest
        if key not in self._pedro_step_keys and len(self._pedro_step_keys) >= self.pedro_rows.num_rows:
            return False  # the step's device rows are taken: prefill in a later step
        # The whole prompt in this step (a recomputed one too: PEDRO requests never read
        # cached KV, so num_computed_tokens is 0), or not at all.
        if request.num_prompt_tokens - request.num_computed_tokens > step_room():
            waited = self._pedro_passed_over[req_id] = self._pedro_passed_over.get(req_id, 0) + 1
            if waited >= RESERVE_AFTER:
                self._pedro_holding = req_id
            return False
        self._pedro_passed_over.pop(req_id, None)
        self._pedro_step_keys.add(key)
        return True

    def schedule(self, *args, **kwargs):
        self._pedro_holding = None
        self._pedro_step_keys = set()
        out = super().schedule(*args, **kwargs)
        out.pedro = self._plan(out)
        return out

    def _plan(self, out) -> PedroStepPlan | None:
        starting = [r.req_id for r in out.scheduled_new_reqs]
        starting += list(out.scheduled_cached_reqs.resumed_req_ids)  # recomputed after preemption
        prefills = [r for r in starting if r in self.pedro_requests]
        if not prefills:
            return None
        keys = list(dict.fromkeys(self.pedro_requests[r].digest for r in prefills))
        rows, fills = self.pedro_rows.assign(keys)
        self.pedro_max_rows_in_step = max(self.pedro_max_rows_in_step, len(keys))
        plan = PedroStepPlan(loads={row: self.pedro_store.get(k) for k, row in fills})
        configs = []
        for req_id in prefills:
            ref = self.pedro_requests[req_id]
            plan.prefills[req_id] = (rows[ref.digest], self.requests[req_id].num_prompt_tokens)
            configs.append(self.pedro_store.get(ref.digest).config)
            self._unpin(req_id)  # prefilled: decoding needs no adapter
        plan.poolers = frozenset(c.pooler for c in configs)
        plan.activations = frozenset(c.activation for c in configs)
        return plan

    def update_from_output(self, scheduler_output, model_runner_output):
        failed = self._pedro_failed
        self._pedro_failed = {}
        finished = self.finish_requests(list(failed), RequestStatus.FINISHED_ERROR) if failed else []
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in finished:
            message = failed[request.request_id]
            logger.warning("PEDRO request %s failed: %s", request.request_id, message)
            eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=request.get_finished_reason(),
                                                stop_reason=message, events=request.take_events(),
                                                trace_headers=request.trace_headers))
        return outputs

    def shutdown(self) -> None:
        if self._pedro_metrics is not None:
            self._pedro_metrics.close()
        self.pedro_store.shutdown()
        super().shutdown()


_classes: dict[type, type] = {}


class PedroScheduler:
    """Named by `scheduler_cls`: vLLM's Scheduler, or its AsyncScheduler when async
    scheduling is on (decided by vLLM after the engine arguments), with the PEDRO mixin."""

    def __new__(cls, vllm_config, *args, **kwargs):
        base = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
        if base not in _classes:
            _classes[base] = type(f"Pedro{base.__name__}", (PedroSchedulerMixin, base), {})
        return _classes[base](vllm_config, *args, **kwargs)
