"""The `vllm-pedro` command: help texts, a tiny training job through main(), errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vllm_pedro.cli import COMMANDS, build_parser, main

TRAIN_FLAGS = ["--model", "--train-file", "--dev-file", "--output-dir", "--max-len", "--method", "--r", "--pooler",
               "--activation", "--targets", "--lora-r", "--lora-alpha", "--lora-dropout", "--lr", "--weight-decay",
               "--warmup-steps", "--warmup-ratio", "--max-grad-norm", "--epochs", "--max-steps", "--batch-size",
               "--grad-accum", "--eval-steps", "--eval-batch-size", "--patience", "--min-delta", "--seed", "--dtype",
               "--device", "--no-progress", "--gradient-checkpointing", "--bf16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    recs = [{"prompt": f"key: {k}. answer:", "response": v} for k, v in
            [("fox", " yes"), ("dog", " no"), ("sky", " cold"), ("film", " blue")] * 3]
    paths = {}
    for name, rows in (("train", recs), ("dev", recs[:4])):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_console_script_train_help_lists_every_flag():
    exe = shutil.which("vllm-pedro", path=os.path.dirname(sys.executable)) or shutil.which("vllm-pedro")
    cmd = [exe] if exe else [sys.executable, "-m", "vllm_pedro.cli"]
    out = subprocess.run(cmd + ["train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in TRAIN_FLAGS:
        assert flag in out.stdout, flag
    assert "(default: 16)" in out.stdout  # --r documents its default
    # The chat format and how it maps to the server.
    for text in ('{"messages": [{"role"', "add_generation_prompt=True", "/v1/chat/completions",
                 "loss is on assistant turns only"):
        assert text in out.stdout, text


def test_every_train_flag_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert set(TRAIN_FLAGS) <= flags
    for a in sub._actions:
        assert a.help and len(a.help) > 10, a.option_strings


def test_commands_table_drives_the_parser():
    assert "train" in COMMANDS
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(COMMANDS)
    with pytest.raises(SystemExit):
        main([])  # a subcommand is required


def test_main_train_writes_a_loadable_adapter(tiny_llama_dir, data, tmp_path, capsys):
    from vllm_pedro.hf.model import PedroModel
    from vllm_pedro.train import load_base_model

    out = tmp_path / "adapter"
    rc = main(["train", "--model", tiny_llama_dir, "--train-file", str(data["train"]), "--dev-file",
               str(data["dev"]), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
               "--lr", "1e-2", "--r", "4", "--pooler", "mean", "--activation", "silu", "--targets", "q,v",
               "--eval-steps", "3", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["best_dev_loss"] < summary["initial_dev_loss"]
    cfg = json.load(open(out / "adapter_config.json"))
    assert (cfg["r"], cfg["pooler"], cfg["activation"], cfg["targets"]) == (4, "mean", "silu", ["q", "v"])
    metrics = json.load(open(out / "train_metrics.json"))
    assert len(metrics["history"]) == 3

    base, _ = load_base_model(tiny_llama_dir)
    pm = PedroModel.from_pretrained(base, str(out))
    assert any(torch.count_nonzero(g.up.weight) > 0 for g in pm.generators)


def test_main_train_memory_flags_reach_the_loop(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc = main(["train", "--model", tiny_llama_dir, "--train-file", str(data["train"]), "--output-dir", str(out),
               "--max-steps", "2", "--batch-size", "4", "--gradient-checkpointing", "--bf16", "--no-progress"])
    assert rc == 0
    args = json.load(open(out / "train_metrics.json"))["args"]
    assert args["gradient_checkpointing"] is True and args["bf16"] is True
    rc = main(["train", "--model", tiny_llama_dir, "--train-file", str(data["train"]), "--output-dir", str(out),
               "--bf16", "--dtype", "float16", "--no-progress"])
    assert rc == 2 and "bf16 autocast needs" in capsys.readouterr().err


def test_main_train_bad_data_is_a_clean_error(tiny_llama_dir, data, tmp_path, capsys):
    with open(data["train"], "a") as f:
        f.write('{"prompt": "x"}\n')  # line 13
    rc = main(["train", "--model", tiny_llama_dir, "--train-file", str(data["train"]),
               "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.jsonl:13:" in err and "missing key 'response'" in err


def test_main_train_bad_option_is_a_clean_error(tiny_llama_dir, data, tmp_path, capsys):
    rc = main(["train", "--model", tiny_llama_dir, "--train-file", str(data["train"]),
               "--output-dir", str(tmp_path / "o"), "--targets", "q", "w", "--no-progress"])
    assert rc == 2 and "unknown or empty targets" in capsys.readouterr().err
    rc = main(["train", "--model", str(tmp_path / "nope"), "--train-file", str(data["train"]),
               "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
