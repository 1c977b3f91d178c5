"""The benchmarks run end to end at tiny sizes: benchmarks/multi_tenant_throughput.py (bare,
PEDRO and multi-LoRA engines alive side by side, passes interleaved, 1 and 3 tenants, both
assignments) and benchmarks/hf_decode_compare.py --smoke (transformers-level decode, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "multi_tenant_throughput.py"
HF = ROOT / "benchmarks" / "hf_decode_compare.py"


def _env():
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")


def test_multi_tenant_throughput_end_to_end(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, str(BENCH), "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
           "--num-tenants", "1", "3", "--assign", "uniform", "zipf", "--passes", "2", "--lora-rank", "8",
           "--pedro-rank", "4", "--max-num-seqs", "8", "--enforce-eager", "--kv-cache-space", "1",
           "--foreign-load", "1.0", "--quiet", "--work-dir", str(tmp_path / "work"), "--output-json", str(out),
           "--plot", str(png)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    assert [(r["num_tenants"], r["assign"]) for r in result["runs"]] == [(1, "uniform"), (1, "zipf"),
                                                                        (3, "uniform"), (3, "zipf")]
    for r in result["runs"]:
        assert set(r["methods"]) == {"bare", "pedro", "lora"}
        for m, stats in r["methods"].items():
            assert len(stats["passes"]) == 2 and stats["out_tok_per_s"]["median"] > 0
            for p in stats["passes"]:
                assert p["output_tokens"] == 4 * 4 and p["prompt_tokens"] == 4 * 8
                assert p["foreign_load"] >= 0 and len(p["loadavg_before"]) == 3
        pedro = r["methods"]["pedro"]
        assert pedro["disk_reads_in_passes"] == 0  # the warm store serves every pass
        assert pedro["warmup"]["disk_reads"] == r["num_tenants"] and pedro["warmup"]["device_rows"] >= 1
        for k in ("pedro_vs_bare", "lora_vs_bare", "pedro_vs_lora", "pedro_vs_bare_cpu"):
            assert r["ratios"][k]["median"] > 0 and r["ratios"][k]["n"] == 2
    assert any("every LoRA-run request carries an adapter" in n for n in result["notes"])
    assert "PEDRO/bare" in proc.stdout  # the table is printed


def test_assignments():
    from vllm_pedro.tools import bench as mtt

    uni = mtt.assignment("uniform", 4000, 8, 0)
    assert set(uni) == set(range(8)) and uni == mtt.assignment("uniform", 4000, 8, 0)
    assert max(Counter(uni).values()) < 1.3 * 4000 / 8
    zipf = Counter(mtt.assignment("zipf", 4000, 64, 0, zipf_s=1.1))
    assert zipf[0] > 5 * zipf.get(31, 1) and zipf[0] > zipf[1] > zipf[7]  # a few hot tenants
    prompts = mtt.make_prompts(100, 3, 5, 0)
    assert [len(p) for p in prompts] == [5, 5, 5] and all(10 <= t < 100 for p in prompts for t in p)


def test_foreign_load_is_measured_from_the_machine():
    from vllm_pedro.tools import bench as mtt

    a = mtt.machine_busy_s()
    sum(i * i for i in range(2_000_000))  # this process keeps a core busy
    b = mtt.machine_busy_s()
    assert a is not None and b > a


def test_hf_decode_compare_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    env = dict(_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(HF), "--smoke", "--output-json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["checks"]) == 2  # PEDRO = PedroModel.generate, LoRA = merged weights
    methods = {(r["method"], r["num_tenants"]) for r in result["results"]}
    assert {("bare", 1), ("pedro", 1), ("pedro", 2), ("lora", 1), ("lora", 2)} <= methods
    assert all(r["decode_tokens_per_s"] > 0 for r in result["results"])


def test_cuda_graph_decode_smoke_and_gpu_check_script():
    """The GPU check's pieces stay runnable: the decode-loop capture script in its CPU mode
    (eager steps, every check), and gpu_check.sh parses."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels" / "cuda_graph_decode.py"), "--cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_adapter_load_rate_smoke(tiny_llama_dir, tmp_path):
    """benchmarks/adapter_load_rate.py on tiny adapters: every stage timed, the store's loader
    threads read them all, none failed."""
    from vllm_pedro.testing import build_random_adapters

    adir = tmp_path / "adapters"
    build_random_adapters(tiny_llama_dir, {i: str(adir / f"tenant-{i}") for i in range(8)}, r=4)
    out = tmp_path / "rate.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_load_rate.py"), "--adapter-dir",
                           str(adir), "--model", tiny_llama_dir, "--count", "4", "--output-json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["stage_ms_median"]) == {"read", "digest", "validate", "stack"}
    assert all(v > 0 for v in r["stage_ms_median"].values())
    assert r["failed"] == 0 and r["store_per_s"] > 0 and r["count"] == 4


def test_multi_turn_smoke(tmp_path):
    """benchmarks/multi_turn.py at tiny sizes: every method and turn reported; a turn's prompt
    is the whole history (the same token counts for every method); PEDRO never reads the
    prefix cache, the bare model does once the history fills a KV block."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    out = tmp_path / "mt.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_turn.py"), "--model", "", "--conversations", "2",
           "--turns", "3", "--user-len", "120", "--answer-len", "8", "--passes", "1", "--enforce-eager",
           "--kv-cache-space", "1", "--lora-rank", "8", "--pedro-rank", "4", "--output-json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_turn = json.loads(out.read_text())["per_turn"]
    assert set(per_turn) == {"bare", "lora", "pedro"}
    for method, turns in per_turn.items():
        assert [t["prompt_tokens"] for t in turns[:3]] == [2 * (t * (120 + 8) + 120) for t in range(3)]
        assert turns[3]["turn"] == "all" and all(t["out_tok_s"] > 0 for t in turns)
    assert all(t["cached_tokens"] == 0 for t in per_turn["pedro"][:3])
    # KV blocks of 128 on the CPU: turn 1's sequence (127 tokens with KV) fills none, turn 2's does
    assert per_turn["bare"][2]["cached_tokens"] > 0
