"""lm-evaluation-harness against `vllm-pedro serve`: its scores equal the project's own.

One server (the tiny random Llama, tenant-a and tenant-b with different random adapters, the
base model served as "tiny-base"). The test asks the server for each model's greedy answer
to candidate prompts, keeps 8 prompts on which the three answers differ, and plants targets
in a local JSONL: docs 0-3 carry tenant-a's answer, 4-5 tenant-b's, 6 the base model's, 7 no
one's, so exact_match must come out 0.5 / 0.25 / 0.125. lm-eval (local-completions, no
tokenizer, nothing downloaded) then runs the generate_until task written by
vllm_pedro.tools.lm_eval: for tenant-a through the `lm_eval` CLI exactly as documented, for
tenant-b and the base model through lm_eval.simple_evaluate; samples are logged. Checked:
the harness's exact_match per filter equals our own exact match over the generations it
logged (after the same filters), those generations equal the server's greedy answers, and
the scores equal the planted values."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip("vllm")
for _mod in ("lm_eval", "aiohttp", "tenacity"):
    pytest.importorskip(_mod, reason="lm-evaluation-harness is not installed: pip install 'lm-eval[api]==0.4.13'")

from vllm_pedro.testing import build_demo, free_port, server_env, start_server, stop_server, wait_ready
from vllm_pedro.tools import lm_eval as tool

BASE = "tiny-base"
MAX_GEN_TOKS = 6
CANDIDATES = ["The quick brown fox", "name: Alpha, food: Italian, area:", "Is the sky blue?", "I love this film!",
              "Prompts go in, tokens", "One backbone serves", "0 1 2 3 4 5", "Vectors scale the",
              "A tenant asks a question", "name: Beta, food: French", "Is fire cold?", "I hate waiting.",
              "plus minus equals what is", "The lazy dog", "fine-tuned tenants at the", "area: riverside, price:"]
PLANT = ["tenant-a"] * 4 + ["tenant-b"] * 2 + [BASE] + [None]  # whose answer each doc's target is
EXPECTED = {"tenant-a": 0.5, "tenant-b": 0.25, BASE: 0.125}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def greedy(port: int, model: str, prompt: str) -> str:
    """What local-completions sends for this task (tool.task_config's generation_kwargs)."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_GEN_TOKS, "temperature": 0, "stop": [], "seed": 1234}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


def first_word(text: str) -> str:  # the "first_word" filter: regex [A-Za-z]+, group 0, fallback
    words = re.findall("[A-Za-z]+", text)
    return words[0] if words else "[invalid]"


OWN_FILTERS = {"strip": str.strip, "first_word": first_word}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("lm_eval")
    model, adapters = build_demo(str(work))
    port = free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = start_server(model, adapters, port, extra_args=["--served-model-name", BASE], env=server_env(), log_file=log)
    try:
        try:
            wait_ready(proc, port, timeout=300)
        except Exception:
            log.flush()
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        answers = {m: [greedy(port, m, p) for p in CANDIDATES] for m in EXPECTED}
        keep = [i for i in range(len(CANDIDATES))
                if len({answers[m][i].strip() for m in EXPECTED} | {"<nobody>"}) == len(EXPECTED) + 1]
        assert len(keep) >= len(PLANT), f"too few prompts where the three answers differ: {answers}"
        keep = keep[:len(PLANT)]
        records = [{"prompt": CANDIDATES[i], "target": answers[who][i].strip() if who else "<nobody>"}
                   for i, who in zip(keep, PLANT)]
        tasks = work / "tasks"
        tool.write_task(records, str(tasks), "pedro_tiny", max_gen_toks=MAX_GEN_TOKS, until=[], first_word=True,
                        cache_dir=str(work / "hf-datasets"))
        yield dict(port=port, work=work, tasks=str(tasks), records=records,
                   answers={m: [answers[m][i] for i in keep] for m in EXPECTED}, model=model)
    finally:
        stop_server(proc)
        log.close()


def check(served, model: str, results: dict, samples: list[dict]) -> None:
    res = results["pedro_tiny"]
    assert res["sample_len"] == len(PLANT)
    records = served["records"]
    for name, fn in OWN_FILTERS.items():
        logged = sorted((s for s in samples if s["filter"] == name), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in logged] == list(range(len(PLANT)))
        raw = [s["resps"][0][0] for s in logged]
        # The harness got the server's greedy answers for this model.
        assert raw == served["answers"][model], (model, name)
        assert [s["target"] for s in logged] == [r["target"] for r in records]
        own = [float(fn(text) == r["target"]) for text, r in zip(raw, records)]
        assert [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
                for s in logged] == [fn(t) for t in raw]
        assert [s["exact_match"] for s in logged] == own, (model, name)
        assert res[f"exact_match,{name}"] == pytest.approx(sum(own) / len(own), abs=1e-12), (model, name)
    assert res["exact_match,strip"] == pytest.approx(EXPECTED[model], abs=1e-12), model


def test_cli_tenant_a(served):
    """The documented command line (benchmarks/lm_eval/README.md), in a subprocess."""
    out = served["work"] / "cli-out"
    args = tool.model_args("tenant-a", f"http://127.0.0.1:{served['port']}")
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(served["work"] / "hf-datasets")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           tool.model_args_string(args), "--tasks", "pedro_tiny", "--include_path", served["tasks"],
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(served["work"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [res_file] = glob.glob(str(out / "tenant-a" / "results_*.json"))
    [samples_file] = glob.glob(str(out / "tenant-a" / "samples_pedro_tiny_*.jsonl"))
    with open(res_file) as f:
        results = json.load(f)["results"]
    with open(samples_file) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    check(served, "tenant-a", results, samples)


def test_python_api_tenant_b_and_base(served, monkeypatch):
    """tool.evaluate (lm_eval.simple_evaluate, local-completions) for two models at once."""
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    out = tool.evaluate(f"http://127.0.0.1:{served['port']}", ["tenant-b", BASE], ["pedro_tiny"], served["tasks"])
    for model in ("tenant-b", BASE):
        check(served, model, out[model]["results"], out[model]["samples"]["pedro_tiny"])
    text = tool.table(out)
    assert "| tenant-b | 0.2500 |" in text and f"| {BASE} | 0.1250 |" in text, text


def test_model_args_string():
    args = tool.model_args("tenant-a", "http://127.0.0.1:8000/")
    assert tool.model_args_string(args) == ("model=tenant-a,base_url=http://127.0.0.1:8000/v1/completions,"
                                            "tokenizer_backend=none,tokenized_requests=False,num_concurrent=4,"
                                            "max_retries=3")
    with pytest.raises(ValueError, match="comma"):
        tool.model_args_string({"model": "a,b"})
