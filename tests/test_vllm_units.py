"""The plugin's pieces without an engine: slots, the TP shard layout, the device adapter
cache against a float64 oracle of each adapter's generator, the scheduler's row map, the
host adapter store, and the serving rule (check_servable)."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from vllm_pedro.adapter_io import load_adapter, read_adapter_files
from vllm_pedro.config import AdapterError, BaseShapes
from vllm_pedro.generator import generate_vectors
from vllm_pedro.testing import build_random_adapter
from vllm_pedro.vllm.adapters import DeviceAdapterCache
from vllm_pedro.vllm.args import PedroArgs, PedroModule
from vllm_pedro.vllm.layout import ShardLayout
from vllm_pedro.vllm.request import PedroRequest, check_servable
from vllm_pedro.vllm.scheduler import DeviceRows
from vllm_pedro.vllm.slots import SlotPool
from vllm_pedro.vllm.store import AdapterWeights, HostAdapterStore, State

KINDS = [dict(r=4, pooler="attention", activation="rational"),
         dict(r=8, pooler="mean", activation="gelu", targets=("q", "k", "v", "up")),
         dict(r=2, pooler="last", activation="silu", targets=("q", "v")),
         dict(r=3, pooler="attention", activation="relu", targets=("v", "up"))]


def test_slot_pool_lifecycle():
    pool = SlotPool(num_layers=2, num_slots=2, width=3, dtype=torch.float32, device=torch.device("cpu"))
    assert pool.nbytes == 2 * 3 * 3 * 4  # 2 slots + the ones row
    assert pool.ones_row == 2 and torch.equal(pool.vectors[:, 2], torch.ones(2, 3))
    a, b = pool.acquire("a"), pool.acquire("b")
    assert {a, b} == {0, 1} and pool.acquire("a") == a  # re-prefill reuses its row
    with pytest.raises(RuntimeError, match="slots exhausted"):
        pool.acquire("c")
    pool.release("a")
    assert pool.acquire("c") == a and pool.num_used == 2
    pool.release("b"), pool.release("c"), pool.release("never")
    assert pool.num_used == 0


def test_shard_layout_tp():
    base = BaseShapes(num_layers=1, hidden_size=8, q_size=8, kv_size=4, ff_size=12)
    full = ShardLayout(("q", "v", "up"), base, num_kv_heads_total=2, head_size=2)
    # [q | k | v] like the fused qkv output, whatever is targeted (k's vectors stay ones), then up
    assert full.columns() == {"q": 0, "k": 8, "v": 12, "up": 16} and full.width == 28 and full.qkv_width == 16
    assert ShardLayout(("q", "v"), base, num_kv_heads_total=2, head_size=2).columns()["up"] == -1
    r1 = ShardLayout(("up", "q", "v"), base, tp_rank=1, tp_size=2, num_kv_heads_total=2, head_size=2)
    assert r1.targets == ("q", "v", "up") and r1.width == 4 + 2 + 2 + 6
    assert [r1.full_range(t) for t in ("q", "v", "up")] == [(4, 8), (2, 4), (6, 12)]
    # 4 ranks, 2 KV heads: ranks 0,1 share head 0 and ranks 2,3 share head 1.
    kv = [ShardLayout(("v",), base, tp_rank=r, tp_size=4, num_kv_heads_total=2, head_size=2).full_range("v")
          for r in range(4)]
    assert kv == [(0, 2), (0, 2), (2, 4), (2, 4)]


def test_pedro_modules_and_args_parse():
    assert PedroModule.parse("a=/x/y") == PedroModule("a", "/x/y")
    assert PedroModule.parse('{"name": "b", "path": "/p", "base_model_name": "m"}').base_model_name == "m"
    for bad in ("noequals", "=p", '{"name": 1'):
        with pytest.raises(ValueError):
            PedroModule.parse(bad)
    with pytest.raises(ValueError, match="duplicate"):
        PedroArgs(modules=[PedroModule("a", "/1"), PedroModule("a", "/2")])
    with pytest.raises(ValueError, match="unknown or no targets.*'o'"):
        PedroArgs(targets=("q", "o"))  # never silently dropped
    assert PedroArgs(targets=("up", "k")).targets == ("k", "up")
    with pytest.raises(ValueError, match="max_cpu_pedro_adapters"):
        PedroArgs(max_adapters=8, max_cpu_adapters=4)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("units")
    return [build_random_adapter(tiny_llama_dir, str(root / f"a{i}"), seed=i, **k) for i, k in enumerate(KINDS)]


def weights_of(path, dtype=torch.float32) -> AdapterWeights:
    files = read_adapter_files(path)
    cfg, t = load_adapter(path)
    return AdapterWeights.build(cfg, files.digest, t, dtype, pin=False)


def oracle_vectors(path, layer, h, layout):
    """Float64, written out from the SPEC: pool the prompt, down, activation, up, 1 + delta;
    laid out in the server's slot row (targets the adapter lacks scale by 1), restricted to
    one rank's shard."""
    cfg, t = load_adapter(path)
    g = lambda name: t[f"generators.{layer}.{name}"].double()  # noqa: E731
    h = h.double()
    if cfg.pooler == "attention":
        pooled = (torch.softmax(h @ g("pool_w"), 0)[:, None] * h).sum(0)
    else:
        pooled = h.mean(0) if cfg.pooler == "mean" else h[-1]
    z = g("down.weight") @ pooled + g("down.bias")
    if cfg.activation == "rational":
        num, den = g("rat_num"), g("rat_den")
        a = sum(num[k] * z ** k for k in range(7)) / (1 + sum(den[k].abs() * z.abs() ** (k + 1) for k in range(5)))
    else:
        a = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[cfg.activation](z)
    vec = 1 + g("up.weight") @ a + g("up.bias")
    cols = cfg.target_columns()
    parts = []
    for tgt in layout.targets:
        lo, hi = layout.full_range(tgt)
        parts.append(vec[cols[tgt][0] + lo:cols[tgt][0] + hi] if tgt in cols else torch.ones(hi - lo, dtype=vec.dtype))
    return torch.cat(parts)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_device_cache_rows_match_the_oracle(adapter_dirs, tp_size):
    """Four adapters (every pooler, every activation, ranks 2-8, different targets) in the
    rows of one cache, six prompts of mixed adapters in one call, per TP rank."""
    cfg, _ = load_adapter(adapter_dirs[0])
    base = cfg.base_shapes
    torch.manual_seed(0)
    lens = [5, 1, 9, 3, 4, 2]
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    h = torch.randn(sum(lens), base.hidden_size) * 2
    which = [0, 1, 2, 3, 0, 2]  # adapter per prompt
    kinds = [load_adapter(p)[0] for p in adapter_dirs]
    poolers, acts = frozenset(c.pooler for c in kinds), frozenset(c.activation for c in kinds)
    for rank in range(tp_size):
        lay = ShardLayout(("q", "k", "v", "up"), base, tp_rank=rank, tp_size=tp_size,
                          num_kv_heads_total=base.kv_size // 32, head_size=32)
        cache = DeviceAdapterCache(base, lay, num_rows=5, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
        rows = [4, 0, 2, 1]  # any row order
        for i, p in enumerate(adapter_dirs):
            cache.write(rows[i], weights_of(p))
        seg_row = torch.tensor([rows[w] for w in which])
        for layer in range(base.num_layers):
            got = generate_vectors(h, seg, seg_row, cache.layer(layer, poolers, acts))
            for i, w in enumerate(which):
                want = oracle_vectors(adapter_dirs[w], layer, h[seg == i], lay)
                torch.testing.assert_close(got[i].double(), want, atol=1e-5, rtol=1e-5)


def test_rewriting_a_row_leaves_nothing_of_the_old_adapter(adapter_dirs):
    """A row that held an r=8 adapter with every target, rewritten with an r=2 (q, v)
    adapter, computes exactly what a fresh row with the r=2 adapter computes."""
    cfg, _ = load_adapter(adapter_dirs[0])
    lay = ShardLayout(("q", "k", "v", "up"), cfg.base_shapes, num_kv_heads_total=2, head_size=32)
    used = DeviceAdapterCache(cfg.base_shapes, lay, 2, 8, torch.float32, torch.device("cpu"))
    fresh = DeviceAdapterCache(cfg.base_shapes, lay, 2, 8, torch.float32, torch.device("cpu"))
    used.write(1, weights_of(adapter_dirs[1]))
    used.write(1, weights_of(adapter_dirs[2]))
    fresh.write(1, weights_of(adapter_dirs[2]))
    h, seg, row = torch.randn(7, cfg.base_shapes.hidden_size), torch.zeros(7, dtype=torch.long), torch.tensor([1])
    for layer in range(cfg.base_shapes.num_layers):
        a = generate_vectors(h, seg, row, used.layer(layer, frozenset({"last"}), frozenset({"silu"})))
        b = generate_vectors(h, seg, row, fresh.layer(layer, frozenset({"last"}), frozenset({"silu"})))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_device_rows_lru_and_bound():
    rows = DeviceRows(2)
    r, fills = rows.assign(["a", "b"])
    assert sorted(r.values()) == [0, 1] and sorted(k for k, _ in fills) == ["a", "b"]
    r2, fills = rows.assign(["a"])
    assert r2 == {"a": r["a"]} and fills == []  # resident: no write
    r3, fills = rows.assign(["c"])  # evicts b (least recently used), not a
    assert r3["c"] == r["b"] and fills == [("c", r["b"])] and set(rows.row_of) == {"a", "c"}
    r4, fills = rows.assign(["b", "c"])  # c is wanted this step: a goes
    assert r4["b"] == r["a"] and r4["c"] == r3["c"] and fills == [("b", r["a"])]
    with pytest.raises(AssertionError):
        rows.assign(["x", "y", "z"])  # more than the rows: the scheduler never asks this


def test_check_servable(adapter_dirs):
    qv = PedroArgs(targets=("q", "v"), max_rank=4)
    with pytest.raises(AdapterError, match="not served"):
        check_servable(load_adapter(adapter_dirs[0])[0], qv)  # targets up
    with pytest.raises(AdapterError, match="max_pedro_rank"):
        check_servable(load_adapter(adapter_dirs[1])[0], qv)  # r=8
    check_servable(load_adapter(adapter_dirs[2])[0], qv)


# -- the host adapter store -----------------------------------------------------------------
def ref_of(path, i):
    return PedroRequest(f"t{i}", i + 1, path, read_adapter_files(path).digest)


def settle(store, ref, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        e = store.want(ref)
        if e.state in (State.READY, State.FAILED) or time.monotonic() > deadline:
            return e
        time.sleep(0.01)


def test_store_reads_each_adapter_once_and_evicts_only_unpinned(adapter_dirs):
    cfg, _ = load_adapter(adapter_dirs[0])
    store = HostAdapterStore(cfg.base_shapes, PedroArgs(targets=("q", "k", "v", "up")), torch.float32, capacity=2)
    refs = [ref_of(p, i) for i, p in enumerate(adapter_dirs)]
    try:
        assert settle(store, refs[0]).state is State.READY
        for _ in range(3):
            assert settle(store, refs[0]).state is State.READY
        assert store.stats.disk_reads == 1  # read once while it stays
        store.want(refs[1], pin=True)
        assert settle(store, refs[1]).state is State.READY and store.num_resident == 2
        # A third adapter evicts the unpinned 0, never the pinned 1.
        assert settle(store, refs[2]).state is State.READY
        assert {k[:8] for k in store._entries} == {refs[1].digest[:8], refs[2].digest[:8]}
        # Everything pinned: a fourth waits instead of growing the store.
        store.want(refs[2], pin=True)
        e = store.want(refs[3])
        assert e.state is State.WAITING and store.num_resident == 2
        store.release(refs[2])
        assert settle(store, refs[3]).state is State.READY and store.num_resident == 2
        w = store.get(refs[3].digest)
        assert w.config.r == KINDS[3]["r"] and w.up_w.shape[0] == cfg.base_shapes.num_layers
        assert store.stats.disk_reads == 4
    finally:
        store.shutdown()


def test_store_refuses_changed_files_and_unservable_adapters(adapter_dirs, tmp_path):
    import shutil

    cfg, _ = load_adapter(adapter_dirs[0])
    store = HostAdapterStore(cfg.base_shapes, PedroArgs(targets=("q", "v"), max_rank=4), torch.float32, capacity=4)
    try:
        moved = tmp_path / "moved"
        shutil.copytree(adapter_dirs[2], moved)
        ref = ref_of(str(moved), 0)
        shutil.copy(f"{adapter_dirs[1]}/adapter_model.safetensors", moved / "adapter_model.safetensors")
        e = settle(store, ref)
        assert e.state is State.FAILED and "changed after it was validated" in e.error
        e = settle(store, ref_of(adapter_dirs[0], 1))
        assert e.state is State.FAILED and "not served" in e.error
        assert store.num_resident == 0
    finally:
        store.shutdown()


def test_store_loader_threads_run_torch_serially(adapter_dirs):
    """A loader thread's torch ops must not start a second OpenMP team beside the model's
    (it would compete for the cores for the life of the engine): the loader runs with one
    OpenMP thread and the calling thread keeps its count."""
    cfg, _ = load_adapter(adapter_dirs[0])
    before = torch.get_num_threads()
    store = HostAdapterStore(cfg.base_shapes, PedroArgs(targets=("q", "k", "v", "up")), torch.float32, capacity=2)
    try:
        assert settle(store, ref_of(adapter_dirs[0], 0)).state is State.READY
        assert store._pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before
        # ... and yields the cores to the model's threads: a higher nice value, this thread's own
        import threading

        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = store._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert theirs == min(19, mine + 10)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    finally:
        store.shutdown()


# -- /metrics (metrics.py) ----------------------------------------------------------------------
def test_metrics_collector_turns_a_snapshot_into_prometheus_series(tmp_path):
    """The front end's collector over the engine's snapshot: every series with vLLM's labels,
    cumulative histogram buckets, and the Grafana dashboard asks only for series it yields."""
    import json
    import re

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_pedro.vllm.metrics import Histogram, PedroCollector, SnapshotWriter, TenantCounter

    hist = Histogram()
    for v in (0.003, 0.003, 0.2, 30.0):
        hist.observe(v)
    tenants = TenantCounter(cap=2)
    for name in ("a", "b", "a", "c", "d", "b"):
        tenants.add(name)
    assert tenants.counts == {"a": 2, "b": 2, "__other__": 2}
    snap = {"store_adapters": 3, "store_capacity": 10, "store_hits": 7, "store_misses": 3, "disk_reads": 3,
            "evictions": 1, "failures": {"missing": 1}, "load_seconds": hist.to_dict(), "device_rows_used": 2,
            "device_rows": 4, "waiting_for_adapter": 1, "running": 5, "finished": {"stop": 4, "error": 1},
            "tenants": tenants.counts}
    path = str(tmp_path / "stats.json")
    writer = SnapshotWriter(path, lambda: snap)
    writer.close()
    collector = PedroCollector()
    collector.watch(path, "m")
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    lab = (("engine", "0"), ("model_name", "m"))
    assert samples[("vllm:pedro_store_hits_total", lab)] == 7
    assert samples[("vllm:pedro_device_rows_used", lab)] == 2
    assert samples[("vllm:pedro_adapter_load_failures_total", tuple(sorted(lab + (("cause", "missing"),))))] == 1
    assert samples[("vllm:pedro_adapter_load_failures_total", tuple(sorted(lab + (("cause", "io"),))))] == 0
    assert samples[("vllm:pedro_requests_finished_total", tuple(sorted(lab + (("finished_reason", "error"),))))] == 1
    assert samples[("vllm:pedro_adapter_load_seconds_count", lab)] == 4
    assert samples[("vllm:pedro_adapter_load_seconds_bucket", tuple(sorted(lab + (("le", "0.005"),))))] == 2
    assert samples[("vllm:pedro_adapter_load_seconds_bucket", tuple(sorted(lab + (("le", "10.0"),))))] == 3
    assert samples[("vllm:pedro_adapter_load_seconds_bucket", tuple(sorted(lab + (("le", "+Inf"),))))] == 4
    assert samples[("vllm:pedro_tenant_requests_total", tuple(sorted(lab + (("tenant", "__other__"),))))] == 2
    names = {n for n, _ in samples}
    import vllm_pedro

    dash = json.load(open(os.path.join(os.path.dirname(vllm_pedro.__file__), "assets", "grafana",
                                       "pedro_dashboard.json")))
    asked = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"vllm:pedro_[a-z_]+", t["expr"])}
    assert asked and asked <= names, asked - names
