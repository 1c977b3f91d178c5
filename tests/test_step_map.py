"""The worker's per-step token -> slot map (runner.StepMap) against the old per-request
Python walk it replaced, on random batches: requests join (base and PEDRO), decode, finish,
get preempted and resume with a recomputed prefill, and the batch order shuffles. Every
step, every token must read the slot of the same request in both, and the prefill spans
must cover the same prompt tokens, grouped by adapter row."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from vllm_pedro.vllm.runner import StepMap
from vllm_pedro.vllm.scheduler import PedroStepPlan
from vllm_pedro.vllm.slots import SlotPool


@dataclass
class Req:
    id: str
    pedro: bool
    prompt_len: int
    computed: int = 0  # tokens with KV (0 after a preemption: recomputed)
    outputs: int = 0


@dataclass
class Batch:
    """What the runner reads of vLLM's InputBatch."""

    req_ids: list[str] = field(default_factory=list)

    @property
    def req_id_to_index(self):
        return {r: i for i, r in enumerate(self.req_ids)}


class OldWalk:
    """runner.PedroRuntime.prepare_step / free_unscheduled before the rewrite (commit
    7508802), reduced to its bookkeeping: a Python loop over every request, every step."""

    def __init__(self, num_slots):
        self.slots = SlotPool(1, num_slots, 1, torch.float32, torch.device("cpu"))

    def step(self, finished, scheduled: dict[str, int], batch: list[str], reqs: dict[str, Req]):
        for r in finished:
            self.slots.release(r)
        for r in [r for r in self.slots.owner if r not in scheduled]:  # preempted
            self.slots.release(r)
        token_slot, prefills, start = [], [], 0
        for r in batch:
            req, n = reqs[r], scheduled[r]
            if not req.pedro:
                slot = -1
            elif req.computed == 0:
                assert n >= req.prompt_len
                slot = self.slots.acquire(r)
                prefills.append((r, list(range(start, start + req.prompt_len))))
            else:
                slot = self.slots.owner.get(r)
            token_slot += [slot] * n
            start += n
        owner = {s: r for r, s in self.slots.owner.items()}
        return [owner.get(s) for s in token_slot], sorted(prefills)


@pytest.mark.parametrize("seed", range(8))
def test_step_map_equals_the_old_walk_on_random_batches(seed):
    rng = random.Random(seed)
    max_reqs, max_tokens = 12, 4096
    new = StepMap(SlotPool(1, max_reqs, 1, torch.float32, torch.device("cpu")), max_tokens, max_reqs, "cpu")
    old = OldWalk(max_reqs)
    reqs: dict[str, Req] = {}
    running: list[str] = []
    preempted: list[str] = []
    finished: list[str] = []
    order: list[str] = []
    counter = 0
    decode_only_same = 0
    for step in range(150):
        # -- what the scheduler decides this step -----------------------------------------
        just_preempted = []
        if running and rng.random() < 0.1:
            r = rng.choice(running)
            running.remove(r)
            preempted.append(r)
            reqs[r].computed = 0
            just_preempted.append(r)
        joins = []
        if rng.random() < 0.35:
            for _ in range(rng.randint(1, 3)):
                if len(running) + len(joins) < max_reqs:
                    counter += 1
                    r = f"r{counter}"
                    reqs[r] = Req(r, rng.random() < 0.7, rng.randint(1, 40))
                    joins.append(r)
        if preempted and rng.random() < 0.3 and len(running) + len(joins) < max_reqs:
            joins.append(preempted.pop(0))  # resumes: its prompt and outputs recomputed
        running += joins
        if not running:
            continue
        scheduled = {}
        for r in running:
            q = reqs[r]
            scheduled[r] = q.prompt_len + q.outputs if q.computed == 0 else 1
        # the batch keeps its order unless something joins or leaves; then it may shuffle
        kept = [r for r in order if r in scheduled]
        order = kept + [r for r in running if r not in kept]
        if joins or finished or just_preempted:
            rng.shuffle(order)
        batch = Batch(list(order))
        # -- both maps ----------------------------------------------------------------------
        prefills = {r: (rng.randrange(3), reqs[r].prompt_len) for r in order  # (adapter row, prompt length)
                    if reqs[r].pedro and reqs[r].computed == 0}
        plan = PedroStepPlan(prefills=prefills) if prefills else None
        num_sched = np.array([scheduled[r] for r in order], dtype=np.int32)
        want_owner, want_prefills = old.step(finished, scheduled, order, reqs)
        new.update(finished, just_preempted, prefills)
        same = plan is None and not finished and not just_preempted and not joins
        before = new.num_rebuilds
        step_info = new.prepare(batch.req_ids, batch.req_id_to_index, num_sched, plan)
        if same:
            decode_only_same += 1
            assert new.num_rebuilds == before  # an unchanged decode step rebuilds nothing
        owner = {s: r for r, s in new.slots.owner.items()}
        total = int(num_sched.sum())
        got_owner = [owner.get(int(s)) for s in new.token_slot[:total]]
        assert got_owner == want_owner, f"step {step}"
        assert (new.token_slot[total:total + 64] == new.slots.ones_row).all()  # padding reads ones
        if plan is None:
            assert step_info is None and want_prefills == []
        else:
            spans = zip(step_info.slots.tolist(), step_info.starts.tolist(), step_info.lengths.tolist())
            got = {owner[s]: list(range(b, b + n)) for s, b, n in spans}
            assert sorted(got.items()) == want_prefills, f"step {step}"
            assert step_info.num_tokens == sum(len(t) for _, t in want_prefills)
            # Grouped by adapter row: each prompt's row is its plan's, and the groups are the
            # runs of equal rows, every prompt in exactly one.
            rows = step_info.rows.tolist()
            assert rows == [prefills[owner[s]][0] for s in step_info.slots.tolist()]
            assert rows == sorted(rows)
            assert [r for row, lo, hi in step_info.groups for r in [row] * (hi - lo)] == rows
            assert len({row for row, _, _ in step_info.groups}) == len(step_info.groups)
            assert step_info.groups[0][1] == 0 and step_info.groups[-1][2] == len(rows)
            assert all(a[2] == b[1] for a, b in zip(step_info.groups, step_info.groups[1:]))
        # -- the step runs: prefills computed, one token each, some finish --------------------
        finished = []
        for r in running:
            reqs[r].computed += scheduled[r]
            reqs[r].outputs += 1
        for r in list(running):
            if rng.random() < 0.08:
                running.remove(r)
                finished.append(r)
    assert decode_only_same > 10  # the shortcut was exercised
    assert len(new.slots.owner) == len(old.slots.owner)
