"""The plugin's pieces without an engine: slots, the TP shard layout, the adapter cache's
batched multi-adapter generator against the per-adapter reference."""

import pytest
import torch

from vllm_pedro.adapter_io import load_adapter
from vllm_pedro.config import AdapterError, BaseShapes
from vllm_pedro.generator import VectorGenerator
from vllm_pedro.tiny import build_random_adapter
from vllm_pedro.vllm.adapters import AdapterCache
from vllm_pedro.vllm.args import PedroArgs, PedroModule
from vllm_pedro.vllm.layout import ShardLayout
from vllm_pedro.vllm.slots import SlotPool

KINDS = [dict(r=4, pooler="attention", activation="rational"),
         dict(r=8, pooler="mean", activation="gelu", targets=("q", "k", "v", "up")),
         dict(r=2, pooler="last", activation="silu", targets=("q", "v")),
         dict(r=3, pooler="attention", activation="relu", targets=("v", "up"))]


def test_slot_pool_lifecycle():
    pool = SlotPool(num_layers=2, num_slots=2, width=3, dtype=torch.float32, device=torch.device("cpu"))
    assert pool.nbytes == 2 * 2 * 3 * 4
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
    assert full.columns() == {"q": 0, "k": -1, "v": 8, "up": 12} and full.width == 24
    r1 = ShardLayout(("up", "q", "v"), base, tp_rank=1, tp_size=2, num_kv_heads_total=2, head_size=2)
    assert r1.targets == ("q", "v", "up") and r1.width == 12
    assert [r1.full_range(t) for t in ("q", "v", "up")] == [(4, 8), (2, 4), (6, 12)]
    # 4 ranks, 2 KV heads: ranks 0,1 share head 0 and ranks 2,3 share head 1.
    kv = [ShardLayout(("v",), base, tp_rank=r, tp_size=4, num_kv_heads_total=2, head_size=2).full_range("v")
          for r in range(4)]
    assert kv == [(0, 2), (0, 2), (2, 4), (2, 4)]


def test_pedro_modules_parse():
    assert PedroModule.parse("a=/x/y") == PedroModule("a", "/x/y")
    assert PedroModule.parse('{"name": "b", "path": "/p", "base_model_name": "m"}').base_model_name == "m"
    for bad in ("noequals", "=p", '{"name": 1'):
        with pytest.raises(ValueError):
            PedroModule.parse(bad)
    with pytest.raises(ValueError, match="duplicate"):
        PedroArgs(modules=[PedroModule("a", "/1"), PedroModule("a", "/2")])


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("units")
    return [build_random_adapter(tiny_llama_dir, str(root / f"a{i}"), seed=i, **k) for i, k in enumerate(KINDS)]


def reference_vectors(path, layer, h, seg, n, layout):
    """The adapter's own VectorGenerator, laid out in the server's slot row (targets the
    adapter lacks scale by 1), restricted to one rank's shard."""
    cfg, t = load_adapter(path)
    g = VectorGenerator(cfg.base_shapes.hidden_size, cfg.r, cfg.out_size, cfg.pooler, cfg.activation)
    g.load_state_dict({k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"generators.{layer}.")})
    vec = g(h, seg, n)
    cols = cfg.target_columns()
    parts = []
    for tgt in layout.targets:
        lo, hi = layout.full_range(tgt)
        if tgt in cols:
            parts.append(vec[:, cols[tgt][0] + lo:cols[tgt][0] + hi])
        else:
            parts.append(torch.ones(n, hi - lo))
    return torch.cat(parts, 1)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_adapter_cache_matches_generators(adapter_dirs, tp_size):
    cfg, _ = load_adapter(adapter_dirs[0])
    base = cfg.base_shapes
    torch.manual_seed(0)
    lens = [5, 1, 9, 3, 4, 2]
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    h = torch.randn(sum(lens), base.hidden_size) * 2
    for rank in range(tp_size):
        lay = ShardLayout(("q", "k", "v", "up"), base, tp_rank=rank, tp_size=tp_size,
                          num_kv_heads_total=base.kv_size // 32, head_size=32)
        cache = AdapterCache(base, lay, capacity=4, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
        rows = cache.ensure({i + 1: (f"a{i}", p) for i, p in enumerate(adapter_dirs)})
        which = [0, 1, 2, 3, 0, 2]  # adapter per request: mixed poolers, activations, ranks, targets
        seg_row = torch.tensor([rows[w + 1] for w in which])
        for layer in range(base.num_layers):
            got = cache.compute_vectors(layer, h, seg, seg_row)
            for i, w in enumerate(which):
                ref = reference_vectors(adapter_dirs[w], layer, h[seg == i], torch.zeros(lens[i], dtype=torch.long),
                                        1, lay)
                torch.testing.assert_close(got[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_adapter_cache_lru_and_growth(adapter_dirs):
    cfg, _ = load_adapter(adapter_dirs[0])
    lay = ShardLayout(("q", "k", "v", "up"), cfg.base_shapes, num_kv_heads_total=2, head_size=32)
    cache = AdapterCache(cfg.base_shapes, lay, capacity=2, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    cache.ensure({1: ("a", adapter_dirs[0])})
    cache.ensure({2: ("b", adapter_dirs[1])})
    cache.ensure({1: ("a", adapter_dirs[0])})  # 1 is now most recently used
    cache.ensure({3: ("c", adapter_dirs[2])})  # evicts 2
    assert set(cache.index) == {1, 3} and cache.rows == 2
    cache.ensure({1: ("a", adapter_dirs[0]), 2: ("b", adapter_dirs[1]), 4: ("d", adapter_dirs[3])})
    assert set(cache.index) == {1, 2, 4} and cache.rows == 3  # one step needs 3: grows
    # Rows loaded before the growth kept their weights: same vectors as a cache that never grew.
    fresh = AdapterCache(cfg.base_shapes, lay, capacity=3, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    ids = {1: ("a", adapter_dirs[0]), 2: ("b", adapter_dirs[1]), 4: ("d", adapter_dirs[3])}
    fresh_rows = fresh.ensure(ids)
    rows = cache.ensure(ids)
    torch.manual_seed(0)
    h, seg = torch.randn(6, cfg.base_shapes.hidden_size), torch.tensor([0, 0, 1, 1, 2, 2])
    for layer in range(cfg.base_shapes.num_layers):
        got = cache.compute_vectors(layer, h, seg, torch.tensor([rows[i] for i in ids]))
        want = fresh.compute_vectors(layer, h, seg, torch.tensor([fresh_rows[i] for i in ids]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bool((cache.up_w != 0).any(dim=(0, 2, 3)).all())  # every row holds a loaded adapter


def test_adapter_cache_refuses_what_it_cannot_serve(adapter_dirs):
    cfg, _ = load_adapter(adapter_dirs[0])
    qv = ShardLayout(("q", "v"), cfg.base_shapes, num_kv_heads_total=2, head_size=32)
    cache = AdapterCache(cfg.base_shapes, qv, capacity=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(AdapterError, match="not served"):
        cache.ensure({1: ("a", adapter_dirs[0])})  # targets up
    with pytest.raises(AdapterError, match="max_pedro_rank"):
        cache.ensure({2: ("b", adapter_dirs[1])})  # r=8
