"""A PedroModel in transformers' Trainer (PedroTrainer) and TRL's SFTTrainer (PedroSFTTrainer).

Oracles: the first logged loss (one batch holding every example, a randomised adapter)
equals this package's own loss on the same examples; the rows TRL prepares equal this
package's encoding (prompt/response and chat); the saved adapter reloads with the trained
model's logits; a run resumed from a checkpoint ends with the uninterrupted run's adapter;
checkpointing does not change the losses."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_pedro.config import PedroConfig
from vllm_pedro.data import (IGNORE_INDEX, Example, PedroDataCollator, collate, encode_chat, encode_example,
                             pad_token_id, row_to_example, to_rows)
from vllm_pedro.hf.model import PedroModel, get_pedro_model
from vllm_pedro.testing import randomize_generators
from vllm_pedro.train import evaluate_loss, load_base_model

transformers = pytest.importorskip("transformers")

KEYS = {"fox": " yes", "dog": " no", "sky": " cold", "film": " blue"}
PROMPTS = [(f"key: {k}. the quick brown. answer:", v) for k, v in KEYS.items()] + \
          [(f"key: {k}. tokens. answer:", v) for k, v in KEYS.items()]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pedro(model_dir: str, seed: int = 5):
    """(PedroModel with small random generator weights, tokenizer): the adapter already
    depends on the prompt, so a wrong prompt length changes the loss."""
    base, tok = load_base_model(model_dir)
    pm = get_pedro_model(base, PedroConfig(r=8))
    randomize_generators(pm, seed, std=0.05, rational_std=0.05)
    return pm, tok


def examples(tok) -> list[Example]:
    return [encode_example(tok, p, r, 64) for p, r in PROMPTS]


def adapter_tensors(pm: PedroModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.adapter_state_dict().items()}


def logits_of(pm: PedroModel, batch) -> torch.Tensor:
    pm.eval()
    with torch.no_grad():
        return pm(batch["input_ids"], attention_mask=batch["attention_mask"],
                  prompt_lengths=batch["prompt_lengths"]).logits


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -- the collator ------------------------------------------------------------------------------
def test_collator_reads_rows_prompt_lengths_and_trl_labels(tiny_llama_dir):
    _, tok = load_base_model(tiny_llama_dir)
    ex = examples(tok)[:3]
    want = collate(ex, pad_token_id(tok))
    collator = PedroDataCollator(tok)
    trl_rows = [{"input_ids": e.input_ids, "labels": [IGNORE_INDEX] * e.prompt_length + e.input_ids[e.prompt_length:]}
                for e in ex]
    for rows in (to_rows(ex), trl_rows, ex):
        got = collator(rows)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k

    ids = ex[0].input_ids
    for labels, why in ((ids, "non-empty prompt"), ([IGNORE_INDEX] * len(ids), "non-empty prompt"),
                        ([IGNORE_INDEX, *ids[1:3], IGNORE_INDEX, *ids[4:]], "labels that are not all the input ids")):
        with pytest.raises(ValueError, match=why):
            row_to_example({"input_ids": ids, "labels": labels})
    with pytest.raises(ValueError, match="needs \"prompt_lengths\" or \"labels\""):
        row_to_example({"input_ids": ids})


# -- transformers' Trainer -------------------------------------------------------------------------
def run_trainer(model_dir, out, steps=6, **kw):
    from transformers import TrainingArguments

    from vllm_pedro.hf.trainer import PedroTrainer

    pm, tok = pedro(model_dir)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=len(PROMPTS), max_steps=steps,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **kw)
    trainer = PedroTrainer(model=pm, args=args, train_dataset=to_rows(examples(tok)),
                           data_collator=PedroDataCollator(tok), processing_class=tok)
    return trainer, pm, tok


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_trainer_trains_pedro_and_saves_the_adapter(tiny_llama_dir, tmp_path, checkpointing):
    trainer, pm, tok = run_trainer(tiny_llama_dir, tmp_path / "run", gradient_checkpointing=checkpointing)
    batch = collate(examples(tok), pad_token_id(tok))
    initial = evaluate_loss(pm, [batch])
    pm.train()
    trainer.train()
    assert pm.is_gradient_checkpointing == checkpointing
    got = losses(trainer)
    assert len(got) == 6
    assert got[0] == pytest.approx(initial, rel=1e-5)  # the Trainer's loss is PEDRO's loss on these examples
    assert got[-1] < 0.7 * got[0]
    if checkpointing:  # the same run without checkpointing: the same losses
        plain, _, _ = run_trainer(tiny_llama_dir, tmp_path / "plain")
        plain.train()
        assert got == pytest.approx(losses(plain), rel=1e-5)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "training_args.json"]
    fresh, _ = load_base_model(tiny_llama_dir)
    reloaded = PedroModel.from_pretrained(fresh, str(out))
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(pm, batch), rtol=0, atol=0)


def test_trainer_resumes_from_a_checkpoint_to_the_same_adapter(tiny_llama_dir, tmp_path):
    from transformers import TrainingArguments

    from vllm_pedro.hf.trainer import PedroTrainer

    def make(out, steps):
        pm, tok = pedro(tiny_llama_dir)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                                 learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=0)
        return PedroTrainer(model=pm, args=args, train_dataset=to_rows(examples(tok)),
                            data_collator=PedroDataCollator(tok)), pm

    whole, pm_whole = make(tmp_path / "whole", 4)
    whole.train()
    ckpt = tmp_path / "whole" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
    assert "model.safetensors" not in os.listdir(ckpt)

    resumed, pm_resumed = make(tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = adapter_tensors(pm_whole), adapter_tensors(pm_resumed)
    first = adapter_tensors(pedro(tiny_llama_dir)[0])
    assert any(not torch.equal(a[k], first[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_trainer_loads_the_best_adapter_at_the_end(tiny_llama_dir, tmp_path):
    """load_best_model_at_end reads the best checkpoint's adapter back. "Best" here is the
    highest dev loss (greater_is_better), the first checkpoint, so it is not the last."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from vllm_pedro.hf.trainer import PedroTrainer

    pm, tok = pedro(tiny_llama_dir)
    rows = to_rows(examples(tok))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=3,
                             learning_rate=1e-2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                             save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             greater_is_better=True, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = PedroTrainer(model=pm, args=args, train_dataset=rows, eval_dataset=rows,
                           data_collator=PedroDataCollator(tok))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = load_file(str(tmp_path / "checkpoint-1" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    now = adapter_tensors(pm)
    assert set(now) == set(best) and any(not torch.equal(best[k], last[k]) for k in best)
    for k in best:
        assert torch.equal(now[k], best[k]), k


def test_trainer_refuses_what_is_not_a_pedro_model(tiny_llama_dir, tmp_path):
    from transformers import TrainingArguments

    from vllm_pedro.hf.trainer import PedroTrainer

    base, _ = load_base_model(tiny_llama_dir)
    with pytest.raises(TypeError, match="trains a PedroModel"):
        PedroTrainer(model=base, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


# -- TRL's SFTTrainer ------------------------------------------------------------------------------
CONVERSATIONS = [([{"role": "user", "content": f"key: {k}. {f}"}], [{"role": "assistant", "content": v.strip()}])
                 for k, v in KEYS.items() for f in ("the quick brown.", "tokens.")]


@pytest.fixture
def no_telemetry(monkeypatch):
    """TRL pings the Hub on start unless told not to; nothing may leave the machine."""
    trl = pytest.importorskip("trl")
    import trl.trainer.base_trainer as bt

    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    calls = []
    monkeypatch.setattr(bt, "send_telemetry", lambda *a, **k: calls.append(a))
    yield trl
    assert not calls


@pytest.mark.parametrize("kind", ["text", "conversational"])
def test_sft_trainer_trains_pedro_on_prompt_completion(tiny_llama_dir, tmp_path, no_telemetry, kind):
    from datasets import Dataset
    from trl import SFTConfig

    from vllm_pedro.hf.sft import PedroSFTTrainer

    pm, tok = pedro(tiny_llama_dir)
    if kind == "text":
        rows = [{"prompt": p, "completion": c} for p, c in PROMPTS]
        ours = examples(tok)
    else:
        rows = [{"prompt": p, "completion": c} for p, c in CONVERSATIONS]
        ours = [encode_chat(tok, p + c, 64)[-1] for p, c in CONVERSATIONS]
    args = SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=len(rows), max_steps=6,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, max_length=64)
    trainer = PedroSFTTrainer(model=pm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    # TRL's tokenisation and prompt masking give this package's examples (for chat: the
    # prompt vLLM's /v1/chat/completions prefills, see test_train_chat).
    assert [row_to_example(r) for r in trainer.train_dataset] == ours

    batch = collate(ours, pad_token_id(tok))
    initial = evaluate_loss(pm, [batch])
    pm.train()
    trainer.train()
    assert pm.is_gradient_checkpointing  # SFTConfig's default, through PEDRO's checkpointing
    got = losses(trainer)
    assert len(got) == 6 and got[0] == pytest.approx(initial, rel=1e-4)  # TRL's fused LM head: float32 sums
    assert got[-1] < 0.7 * got[0]

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert "model.safetensors" not in os.listdir(out) and "README.md" not in os.listdir(out)
    fresh, _ = load_base_model(tiny_llama_dir)
    reloaded = PedroModel.from_pretrained(fresh, str(out))
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(pm, batch), rtol=0, atol=0)


def test_sft_trainer_refuses_packing_and_full_sequence_loss(tiny_llama_dir, tmp_path, no_telemetry):
    from datasets import Dataset
    from trl import SFTConfig

    from vllm_pedro.hf.sft import PedroSFTTrainer

    pm, tok = pedro(tiny_llama_dir)
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PROMPTS])
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="packing"):
        PedroSFTTrainer(model=pm, args=SFTConfig(packing=True, **common), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="completion_only_loss"):
        PedroSFTTrainer(model=pm, args=SFTConfig(completion_only_loss=False, **common), train_dataset=data,
                        processing_class=tok)
