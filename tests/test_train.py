"""Training: data reading and collation, the loop (PEDRO learns a prompt-dependent task,
the saved adapter reloads to the same dev loss), the peft baselines, early stopping and
gradient accumulation."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from vllm_pedro.data import (IGNORE_INDEX, DataError, batches, collate, encode_example, encode_records,
                             pad_token_id, read_jsonl)
from vllm_pedro.hf.model import PedroModel
from vllm_pedro.train import (METRICS_NAME, TrainArgs, accumulate_gradients, evaluate_loss, load_base_model,
                              token_loss_sum, train, wrap_model)

# A task the base model cannot do: the answer is a fixed word chosen by the key in the
# prompt; the filler around the key varies, and dev prompts use fillers not seen in training.
KEYS = {"fox": " yes", "dog": " no", "sky": " cold", "film": " blue"}
FILLER = ("the quick brown lazy tenant model answers prompts tokens vectors scale query value "
          "layer one backbone serves many").split()


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    keys = list(KEYS)
    out = []
    for i in range(n):
        k = keys[i % len(keys)]
        filler = " ".join(rng.sample(FILLER, rng.randint(2, 5)))
        out.append({"prompt": f"key: {k}. {filler}. answer:", "response": KEYS[k]})
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    train_recs, dev_recs = make_records(128, seed=0), make_records(32, seed=1)
    seen = {r["prompt"] for r in train_recs}
    dev_recs = [r for r in dev_recs if r["prompt"] not in seen]  # held-out prompts only
    return write_jsonl(d / "train.jsonl", train_recs), write_jsonl(d / "dev.jsonl", dev_recs)


def dev_batches(tokenizer, path, max_len=64, batch_size=16):
    ex = encode_records(tokenizer, read_jsonl(path), max_len)
    return list(batches(ex, batch_size, pad_token_id(tokenizer)))


def base_args(model_dir, task, out, **kw) -> TrainArgs:
    defaults = dict(model=model_dir, train_file=task[0], dev_file=task[1], output_dir=str(out), lr=1e-2,
                    batch_size=16, max_len=64, progress=False, seed=0)
    defaults.update(kw)
    return TrainArgs(**defaults)


# -- the training loop ---------------------------------------------------------------------
def test_pedro_learns_prompt_dependent_task_and_adapter_reloads(tiny_llama_dir, task, tmp_path):
    base, tok = load_base_model(tiny_llama_dir)
    dev = dev_batches(tok, task[1])
    base_loss = evaluate_loss(base, dev)

    out = tmp_path / "pedro"
    m = train(base_args(tiny_llama_dir, task, out, epochs=15, eval_steps=20, r=8))
    print(f"\nbase dev loss {base_loss:.4f} -> PEDRO dev loss {m['best_dev_loss']:.4f} "
          f"({m['steps']} steps, {m['wall_time_s']:.1f} s)")
    # An untrained adapter is the base model.
    assert m["initial_dev_loss"] == pytest.approx(base_loss, rel=1e-5)
    assert m["best_dev_loss"] < 0.5 * base_loss
    # Better than any prompt-independent answer: knowing only the answer distribution
    # (4 keys, uniform) costs ln(4) on the word token; the loss is a mean over word + EOS.
    assert m["best_dev_loss"] < 0.5 * math.log(4) / 2
    assert m["steps"] == 15 * 8 and not m["stopped_early"]
    assert m["trainable_params"] > 0

    saved = json.load(open(out / METRICS_NAME))
    assert len(saved["history"]) == m["steps"] and saved["best_dev_loss"] == m["best_dev_loss"]
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isfile(out / "adapter_config.json")

    fresh, _ = load_base_model(tiny_llama_dir)
    reloaded = PedroModel.from_pretrained(fresh, str(out))
    assert evaluate_loss(reloaded, dev) == pytest.approx(m["best_dev_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_baselines_train_and_save(tiny_llama_dir, task, tmp_path, method):
    from peft import PeftModel

    out = tmp_path / method
    m = train(base_args(tiny_llama_dir, task, out, method=method, max_steps=3, eval_steps=3, lr=5e-2))
    assert m["steps"] == 3 and m["trainable_params"] > 0
    assert m["best_dev_loss"] < m["initial_dev_loss"]
    files = os.listdir(out)
    assert "adapter_model.safetensors" in files and METRICS_NAME in files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["peft_type"] == method.upper()
    if method == "lora":
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    else:
        assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
        assert cfg["feedforward_modules"] == ["down_proj"]

    fresh, tok = load_base_model(tiny_llama_dir)
    reloaded = PeftModel.from_pretrained(fresh, str(out))
    assert evaluate_loss(reloaded, dev_batches(tok, task[1])) == pytest.approx(m["best_dev_loss"], rel=1e-5)


def test_early_stopping_stops_at_patience_and_keeps_best(tiny_llama_dir, task, tmp_path):
    # No evaluation counts as an improvement over the untrained adapter (min_delta is huge),
    # so training stops after `patience` evaluations and the step-0 adapter is what is saved.
    out = tmp_path / "es"
    m = train(base_args(tiny_llama_dir, task, out, epochs=5, eval_steps=2, patience=3, min_delta=1e9))
    assert m["stopped_early"] and m["steps"] == 6 and m["best_step"] == 0
    assert [e["step"] for e in m["evals"]] == [0, 2, 4, 6]
    assert m["evals"][-1]["dev_loss"] < m["evals"][0]["dev_loss"]  # it did train ...
    fresh, tok = load_base_model(tiny_llama_dir)
    pm = PedroModel.from_pretrained(fresh, str(out))  # ... but the kept adapter is the best (initial) one
    assert all(torch.count_nonzero(g.up.weight) == 0 for g in pm.generators)
    assert m["best_dev_loss"] == pytest.approx(m["initial_dev_loss"])


def test_dev_loss_improvement_keeps_training(tiny_llama_dir, task, tmp_path):
    m = train(base_args(tiny_llama_dir, task, tmp_path / "p", max_steps=4, eval_steps=1, patience=1))
    # Each evaluation improves at this stage, so patience 1 does not stop it.
    assert m["steps"] == 4 and not m["stopped_early"] and m["best_step"] == 4


def test_patience_needs_dev_file(tiny_llama_dir, task, tmp_path):
    with pytest.raises(ValueError, match="dev file"):
        train(base_args(tiny_llama_dir, task, tmp_path / "x", dev_file=None, patience=2))


@pytest.mark.parametrize("method", ["pedro", "lora"])
def test_grad_accumulation_equals_bigger_batch(tiny_llama_dir, method):
    base, tok = load_base_model(tiny_llama_dir)
    torch.manual_seed(0)
    model = wrap_model(base, TrainArgs(model="", train_file="", output_dir="", method=method))
    with torch.no_grad():  # move off the zero init so every trainable tensor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    recs = [("key: fox. the quick brown lazy. answer:", " yes"), ("key: dog. model. answer:", " no no no"),
            ("key: sky. tokens vectors. answer:", " cold"), ("key: film. one. answer:", " blue blue")]
    ex = [encode_example(tok, p, r, 64) for p, r in recs]
    pid = pad_token_id(tok)
    small = [collate(ex[:2], pid), collate(ex[2:], pid)]
    n_small = [int((b["labels"] != IGNORE_INDEX).sum()) for b in small]
    assert n_small[0] != n_small[1]  # unequal token counts: a mean of means would differ

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, micro)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_acc, g_acc = grads(small)
    loss_big, g_big = grads([collate(ex, pid)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for n in g_big:
        assert g_big[n].abs().sum() > 0, n
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("method", ["pedro", "lora", "ia3"])
def test_token_loss_sum_equals_loss_over_full_logits(tiny_llama_dir, method):
    """token_loss_sum runs the LM head only where a response token is predicted; oracle:
    the cross entropy over the full [B, T, V] logits, value and gradients."""
    base, tok = load_base_model(tiny_llama_dir)
    torch.manual_seed(1)
    model = wrap_model(base, TrainArgs(model="", train_file="", output_dir="", method=method))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    recs = [("key: fox. the quick brown lazy tenant model. answer:", " yes"), ("key: dog. answer:", " no no no"),
            ("key: sky. tokens vectors scale. answer:", " cold blue")]
    batch = collate([encode_example(tok, p, r, 64) for p, r in recs], pad_token_id(tok))

    model.zero_grad(set_to_none=True)
    loss, n = token_loss_sum(model, batch)
    loss.backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    model.zero_grad(set_to_none=True)
    kwargs = {"prompt_lengths": batch["prompt_lengths"]} if isinstance(model, PedroModel) else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[mask], reduction="sum")
    ref.backward()
    assert n == int(mask.sum()) > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g[k], p.grad, rtol=1e-4, atol=1e-7, msg=k)


def test_grad_accumulation_step_matches_bigger_batch_end_to_end(tiny_llama_dir, task, tmp_path):
    from safetensors.torch import load_file

    a = train(base_args(tiny_llama_dir, task, tmp_path / "a", dev_file=None, batch_size=4, grad_accum=1, max_steps=2))
    b = train(base_args(tiny_llama_dir, task, tmp_path / "b", dev_file=None, batch_size=2, grad_accum=2, max_steps=2))
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-5)
    ta = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for n in ta:
        torch.testing.assert_close(ta[n], tb[n], rtol=1e-4, atol=1e-5, msg=n)  # lr 1e-2 updates


def test_seed_makes_runs_repeatable(tiny_llama_dir, task, tmp_path):
    runs = [train(base_args(tiny_llama_dir, task, tmp_path / str(i), dev_file=None, max_steps=3, seed=7,
                            pooler="last", activation="gelu"))
            for i in range(2)]
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]


# -- bi-level optimisation -------------------------------------------------------------------
def test_bilevel_each_parameter_group_steps_only_on_its_own_data(tiny_llama_dir, task, tmp_path, monkeypatch):
    """Weight steps see only the training part and move only the generator weights; the
    coefficient steps see only held-out examples and move only the rational coefficients."""
    import vllm_pedro.train as tr

    base, tok = load_base_model(tiny_llama_dir)
    examples = encode_records(tok, read_jsonl(task[0]), 64)
    rest, held = tr.split_holdout(examples, 0.25, seed=3)
    key = lambda e: tuple(e.input_ids)  # noqa: E731
    assert len(held) == 32 and len(rest) == 96 and not {key(e) for e in rest} & {key(e) for e in held}
    held_rows = {key(e) for e in held}

    calls = []
    real = tr.accumulate_gradients

    def spy(model, micro, *rest):
        rows = {tuple(r[m.bool()].tolist()) for b in micro for r, m in zip(b["input_ids"], b["attention_mask"])}
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        calls.append({"held": rows <= held_rows, "train": not rows & held_rows, "before": before, "model": model})
        return real(model, micro, *rest)

    monkeypatch.setattr(tr, "accumulate_gradients", spy)
    m = train(base_args(tiny_llama_dir, task, tmp_path / "bl", dev_file=None, max_steps=4, bilevel=True,
                        bilevel_holdout=0.25, seed=3))
    assert m["bilevel"]["holdout_examples"] == 32 and m["bilevel"]["upper_steps"] == 4
    assert m["train_examples"] == 96 and [("upper_loss" in h) for h in m["history"]] == [True] * 4
    assert len(calls) == 8  # weights, coefficients, weights, ...
    model = calls[0]["model"]
    after = [c["before"] for c in calls[1:]] + [{n: p.detach().clone() for n, p in model.named_parameters()
                                                   if p.requires_grad}]
    for i, (c, nxt) in enumerate(zip(calls, after)):
        upper_turn = i % 2 == 1
        assert c["held"] if upper_turn else c["train"], f"call {i} read the other group's data"
        moved = {n for n in c["before"] if not torch.equal(c["before"][n], nxt[n])}
        assert moved, f"call {i} changed nothing"
        assert all(tr.is_upper_level(n) == upper_turn for n in moved), f"call {i} moved {sorted(moved)[:3]}"


def test_bilevel_runs_are_repeatable_and_differ_from_joint(tiny_llama_dir, task, tmp_path):
    kw = dict(dev_file=None, max_steps=3, seed=5)
    runs = [train(base_args(tiny_llama_dir, task, tmp_path / str(i), bilevel=True, bilevel_lr=3e-2, **kw))
            for i in range(2)]
    assert [(h["loss"], h["upper_loss"]) for h in runs[0]["history"]] == \
        [(h["loss"], h["upper_loss"]) for h in runs[1]["history"]]
    joint = train(base_args(tiny_llama_dir, task, tmp_path / "joint", **kw))
    assert joint["bilevel"] is None and joint["train_examples"] > runs[0]["train_examples"]


def test_bilevel_needs_pedro_with_rational_activation(tmp_path):
    with pytest.raises(ValueError, match="rational"):
        TrainArgs(model="m", train_file="t", output_dir=str(tmp_path), bilevel=True, activation="gelu").validate()
    with pytest.raises(ValueError, match="rational"):
        TrainArgs(model="m", train_file="t", output_dir=str(tmp_path), bilevel=True, method="lora").validate()
    with pytest.raises(ValueError, match="bilevel_holdout"):
        TrainArgs(model="m", train_file="t", output_dir=str(tmp_path), bilevel=True, bilevel_holdout=1.0).validate()


# -- data ------------------------------------------------------------------------------------
def test_bad_jsonl_line_is_named(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"})
    cases = {
        "{not json": "not valid JSON",
        json.dumps(["a", "b"]): "expected a JSON object",
        json.dumps({"prompt": "p"}): "missing key 'response'",
        json.dumps({"prompt": "p", "response": 3}): "'response' must be a string",
        json.dumps({"prompt": "", "response": "r"}): "empty prompt",
    }
    for bad, why in cases.items():
        path = write_jsonl(tmp_path / "d.jsonl", [])
        with open(path, "w") as f:
            f.write(good + "\n\n" + bad + "\n" + good + "\n")  # blank line 2 still counts
        with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{why}"):
            read_jsonl(path)
    with open(path, "w") as f:
        f.write("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(path)
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_read_jsonl_records_and_line_numbers(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b", "id": 1}) + "\n\n"
                    + json.dumps({"prompt": "c", "response": ""}) + "\n")
    recs = read_jsonl(str(path))
    assert [(r.prompt, r.response, r.line) for r in recs] == [("a", "b", 1), ("c", "", 3)]


def test_encode_and_collate(tiny_llama_dir):
    _, tok = load_base_model(tiny_llama_dir)
    p_ids = tok("key: fox. answer:")["input_ids"]
    r_ids = tok(" yes", add_special_tokens=False)["input_ids"]
    e = encode_example(tok, "key: fox. answer:", " yes", 64)
    assert e.input_ids == p_ids + r_ids + [tok.eos_token_id] and e.prompt_length == len(p_ids)

    # Too long: the prompt is cut from the left, the response is kept whole.
    long_prompt = "the quick brown fox " * 20 + "answer:"
    full = tok(long_prompt)["input_ids"]
    e2 = encode_example(tok, long_prompt, " yes", 12)
    assert len(e2.input_ids) == 12 and e2.input_ids[-len(r_ids) - 1:] == r_ids + [tok.eos_token_id]
    assert e2.input_ids[:e2.prompt_length] == full[-e2.prompt_length:]
    # A response that alone does not fit leaves one prompt token.
    e3 = encode_example(tok, long_prompt, " yes no" * 20, 8)
    assert len(e3.input_ids) == 8 and e3.prompt_length == 1

    b = collate([e, e2], pad_token_id(tok))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 12)
    assert b["prompt_lengths"].tolist() == [e.prompt_length, e2.prompt_length]
    n = len(e.input_ids)
    assert b["attention_mask"][0].tolist() == [1] * n + [0] * (12 - n)
    assert (b["input_ids"][0, n:] == pad_token_id(tok)).all()
    lab = b["labels"][0].tolist()
    assert lab[:e.prompt_length] == [IGNORE_INDEX] * e.prompt_length
    assert lab[e.prompt_length:n] == e.input_ids[e.prompt_length:] and lab[n:] == [IGNORE_INDEX] * (12 - n)


# -- memory: gradient checkpointing and bf16 autocast --------------------------------------------
def randomized_pedro(model_dir, seed=3, **config):
    from vllm_pedro.config import PedroConfig
    from vllm_pedro.hf.model import get_pedro_model
    from vllm_pedro.testing import randomize_generators

    base, tok = load_base_model(model_dir)
    pm = get_pedro_model(base, PedroConfig(r=8, **config))
    randomize_generators(pm, seed, std=0.1, rational_std=0.05)  # every parameter gets a gradient
    pm.train()
    return pm, tok


def memory_batch(tok):
    recs = [("key: fox. the quick brown lazy. answer:", " yes"), ("key: dog. model. answer:", " no no no"),
            ("key: sky. tokens vectors. answer:", " cold")]
    return collate([encode_example(tok, p, r, 64) for p, r in recs], pad_token_id(tok))


def loss_and_grads(pm, batch, amp_dtype=None):
    pm.zero_grad(set_to_none=True)
    loss = accumulate_gradients(pm, [batch], amp_dtype)
    return loss, {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [("q", "v", "up"), ("k", "up")])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, targets):
    pm, tok = randomized_pedro(tiny_model_dir, targets=targets)
    batch = memory_batch(tok)
    calls = []
    pm.generators[0].register_forward_hook(lambda *a: calls.append(1))
    loss, grads = loss_and_grads(pm, batch)
    assert len(calls) == 1
    pm.gradient_checkpointing_enable()
    assert pm.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(pm, batch)
    assert len(calls) == 3  # the layer ran again in backward, and the generator with it
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for n in grads:
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-9, msg=n)
    pm.gradient_checkpointing_disable()
    assert not pm.is_gradient_checkpointing


def test_checkpointing_without_the_prompt_mask_fails_and_reentrant_is_refused(tiny_llama_dir):
    """The control: transformers' own checkpointing reruns the layers after the prompt
    mask was cleared, so the generators are skipped in the recomputation."""
    from torch.utils.checkpoint import CheckpointError

    pm, tok = randomized_pedro(tiny_llama_dir)
    pm.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(CheckpointError, match="different number of tensors"):
        loss_and_grads(pm, memory_batch(tok))
    with pytest.raises(ValueError, match="non-reentrant"):
        pm.gradient_checkpointing_enable({"use_reentrant": True})


def test_train_with_gradient_checkpointing_matches_without(tiny_llama_dir, task, tmp_path):
    from safetensors.torch import load_file

    kw = dict(dev_file=None, max_steps=3, batch_size=8)
    a = train(base_args(tiny_llama_dir, task, tmp_path / "a", **kw))
    b = train(base_args(tiny_llama_dir, task, tmp_path / "b", gradient_checkpointing=True, **kw))
    assert b["args"]["gradient_checkpointing"] and not a["args"]["gradient_checkpointing"]
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-6)
    ta, tb = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "ab")
    for n in ta:
        torch.testing.assert_close(tb[n], ta[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_keeps_float32_gradients_near_the_float32_ones(tiny_llama_dir):
    pm, tok = randomized_pedro(tiny_llama_dir)
    batch = memory_batch(tok)
    loss, grads = loss_and_grads(pm, batch)
    loss_bf16, grads_bf16 = loss_and_grads(pm, batch, torch.bfloat16)
    assert loss_bf16 != loss and loss_bf16 == pytest.approx(loss, rel=2e-2)  # it did compute in bf16
    assert all(p.dtype == torch.float32 for p in pm.generators.parameters())
    for n in grads:
        assert grads_bf16[n].dtype == torch.float32, n
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_bf16 = torch.cat([grads_bf16[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_bf16, dim=0) > 0.99


def test_bf16_training_lowers_the_loss(tiny_llama_dir, task, tmp_path):
    from safetensors.torch import load_file

    fp32 = train(base_args(tiny_llama_dir, task, tmp_path / "fp32", max_steps=12, eval_steps=12))
    m = train(base_args(tiny_llama_dir, task, tmp_path / "bf16", max_steps=12, eval_steps=12, bf16=True,
                        gradient_checkpointing=True))
    assert m["args"]["bf16"] and m["best_dev_loss"] < 0.8 * m["initial_dev_loss"]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    assert [h["loss"] for h in m["history"]] != [h["loss"] for h in fp32["history"]]  # autocast was on
    assert m["best_dev_loss"] == pytest.approx(fp32["best_dev_loss"], rel=0.1)
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_bf16_needs_a_float32_or_bfloat16_base(tmp_path):
    with pytest.raises(ValueError, match="bf16 autocast"):
        TrainArgs(model="m", train_file="t", output_dir=str(tmp_path), bf16=True, dtype="float16").validate()
