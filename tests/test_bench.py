"""The benchmarks run end to end at tiny sizes: benchmarks/multi_tenant_throughput.py
(bare, PEDRO and multi-LoRA in fresh vLLM engines, 1 and 2 tenants, both assignments)
and benchmarks/hf_decode_compare.py --smoke (transformers-level decode, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "multi_tenant_throughput.py"
HF = ROOT / "benchmarks" / "hf_decode_compare.py"


def _env():
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_multi_tenant_throughput_end_to_end(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, str(BENCH), "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
           "--num-tenants", "1", "2", "--lora-rank", "8", "--pedro-rank", "4", "--max-num-seqs", "8",
           "--enforce-eager", "--quiet", "--in-process", "--work-dir", str(tmp_path / "work"),
           "--output-json", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    seen = {(r["method"], r["num_tenants"], r["assign"]) for r in result["runs"]}
    assert seen == {(m, n, a) for m in ("bare", "pedro", "lora") for n in (1, 2)
                    for a in ("round-robin", "random")}
    for r in result["runs"]:
        for k in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert r[k] > 0, (r["method"], r["num_tenants"], k)
        assert r["num_requests"] == 4 and r["output_tokens"] == 4 * 4 and r["prompt_tokens"] == 4 * 8
    for s in result["summary"]:
        for k in ("pedro_vs_bare", "lora_vs_bare", "pedro_vs_lora"):
            assert s[k] > 0
    assert any("every LoRA-run request carries an adapter" in n for n in result["notes"])
    assert "PEDRO/LoRA" in proc.stdout  # the ratio table is printed


def test_assignment_spreads_over_every_tenant():
    from vllm_pedro.tools import bench as mtt
    rr = mtt.assignment("round-robin", 10, 4, 0)
    assert rr == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    rnd = mtt.assignment("random", 64, 4, 0)
    assert set(rnd) == {0, 1, 2, 3} and rnd == mtt.assignment("random", 64, 4, 0)
    prompts = mtt.make_prompts(100, 3, 5, 0)
    assert [len(p) for p in prompts] == [5, 5, 5] and all(10 <= t < 100 for p in prompts for t in p)


def test_hf_decode_compare_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    proc = subprocess.run([sys.executable, str(HF), "--smoke", "--output-json", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["checks"]) == 2  # PEDRO = PedroModel.generate, LoRA = merged weights
    methods = {(r["method"], r["num_tenants"]) for r in result["results"]}
    assert {("bare", 1), ("pedro", 1), ("pedro", 2), ("lora", 1), ("lora", 2)} <= methods
    assert all(r["decode_tokens_per_s"] > 0 for r in result["results"])


def test_fresh_subprocess_per_run(tmp_path):
    """The default isolation (one subprocess per engine), on the smallest possible sweep."""
    pytest.importorskip("vllm")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--num-prompts", "2", "--input-len", "8", "--output-len", "2",
           "--num-tenants", "1", "--methods", "bare", "--assign", "round-robin", "--enforce-eager", "--quiet",
           "--output-json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["in_process"] is False
    [run] = result["runs"]
    assert run["method"] == "bare" and run["output_tokens_per_s"] > 0
