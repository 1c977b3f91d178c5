"""Chat data ({"messages"} records): reading, the encoding (one example per assistant turn,
loss on assistant turns only, the prompt exactly as vLLM renders it), and end to end: a
tenant trained with `vllm-pedro train` on chat data answers through the server's
/v1/chat/completions with the tokens of the transformers reference.

The tiny model here has a tokenizer that adds BOS to text and a chat template that writes
BOS itself, so a prompt tokenised with the wrong add_special_tokens differs (two BOS)."""

from __future__ import annotations

import json
import random
import shutil
import urllib.request

import pytest
import torch

from vllm_pedro.data import (IGNORE_INDEX, ChatRecord, DataError, chat_prompt_ids, collate, encode_chat,
                             encode_records, pad_token_id, read_jsonl)
from vllm_pedro.train import load_base_model

KEYS = {"fox": "yes", "dog": "no", "sky": "cold", "film": "blue"}
FILLER = "the quick brown lazy tenant model answers prompts tokens vectors".split()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conversation(rng: random.Random, turns: int = 2) -> list[dict]:
    msgs = [{"role": "system", "content": "answer with one word"}]
    for _ in range(turns):
        k = rng.choice(list(KEYS))
        msgs.append({"role": "user", "content": f"key: {k}. {' '.join(rng.sample(FILLER, 3))}."})
        msgs.append({"role": "assistant", "content": KEYS[k]})
    return msgs


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def bos_model_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny Llama with a tokenizer whose text encoding adds BOS and whose chat template
    writes BOS (as Llama 3's do)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-bos") / "model"
    shutil.copytree(tiny_llama_dir, d)
    tok = AutoTokenizer.from_pretrained(str(d))
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the BOS trap is armed
    return str(d)


@pytest.fixture(scope="module")
def tok(bos_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_model_dir)


# -- reading ---------------------------------------------------------------------------------
def test_read_chat_records_and_refuse_mixed_kinds(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat, chat])
    recs = read_jsonl(path)
    assert [type(r) for r in recs] == [ChatRecord, ChatRecord] and recs[1].messages == chat["messages"]
    assert recs[1].line == 2 and recs[1].source.endswith("c.jsonl:2")

    mixed = write_jsonl(tmp_path / "m.jsonl", [chat, {"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: a prompt/response record in a file of chat .*line 1"):
        read_jsonl(mixed)
    mixed = write_jsonl(tmp_path / "m2.jsonl", [{"prompt": "p", "response": "r"}, chat])
    with pytest.raises(DataError, match=r"m2\.jsonl:2: a chat .* in a file of prompt/response records"):
        read_jsonl(mixed)


@pytest.mark.parametrize("messages, why", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string, got missing"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\['content'\] must be a string, got a list"),
    ([{"role": "", "content": "x"}], "empty role"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "no assistant message"),
    ([{"role": "assistant", "content": "x"}], "no assistant message after the first"),
])
def test_bad_chat_record_is_named(tmp_path, messages, why):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{why}"):
        read_jsonl(path)


# -- encoding ----------------------------------------------------------------------------------
def test_one_example_per_assistant_turn_loss_on_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "answer with one word"},
            {"role": "user", "content": "key: fox. the quick."}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "key: dog."}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": "key: sky."}, {"role": "assistant", "content": "cold"}]
    examples = encode_chat(tok, msgs, max_len=512)
    assert len(examples) == 3
    batch = collate(examples, pad_token_id(tok))
    for k, (e, i) in enumerate(zip(examples, (2, 4, 6))):
        # Oracle, in text: the prompt is the template's rendering of the conversation before
        # turn i with the generation prompt; the rest is what the template writes from there
        # to the end of turn i (the tiny template closes a turn with a newline).
        prompt_text = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
        assert full_text.startswith(prompt_text) and full_text[len(prompt_text):] == msgs[i]["content"] + "\n"
        assert e.input_ids == tok(full_text, add_special_tokens=False)["input_ids"]
        assert e.input_ids[:e.prompt_length] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        assert e.input_ids.count(tok.bos_token_id) == 1 and e.input_ids[0] == tok.bos_token_id
        labels = batch["labels"][k]
        n = len(e.input_ids)
        assert (labels[:e.prompt_length] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert labels[e.prompt_length:n].tolist() == e.input_ids[e.prompt_length:]
        # The loss is on this assistant turn only: the labelled tokens are its text.
        assert tok.decode(labels[e.prompt_length:n].tolist()) == msgs[i]["content"] + "\n"


def test_encode_records_concatenates_turns_in_order(tok):
    rng = random.Random(0)
    convs = [conversation(rng, turns=t) for t in (1, 3, 2)]
    examples = encode_records(tok, [ChatRecord(c, i + 1, f"x:{i + 1}") for i, c in enumerate(convs)], 512)
    expected = [encode_chat(tok, c, 512) for c in convs]
    assert [len(x) for x in expected] == [1, 3, 2]
    assert examples == [e for x in expected for e in x]


def test_chat_prompt_is_what_vllm_renders(bos_model_dir, tok):
    """Oracle: vLLM 0.32's own renderer, called as its /v1/chat/completions does (the
    request's chat and tokenisation parameters from ChatCompletionRequest, the server's
    template defaults from vllm/renderers/online_renderer.py: no tools, tokenize=False for
    a non-Mistral tokenizer)."""
    pytest.importorskip("vllm")
    from vllm.config import ModelConfig, VllmConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.registry import renderer_from_config

    model_config = ModelConfig(model=bos_model_dir, tokenizer=bos_model_dir, dtype="float32", max_model_len=512)
    renderer = renderer_from_config(VllmConfig(model_config=model_config))

    def vllm_prompt(messages):
        req = ChatCompletionRequest(model="tenant", messages=messages)
        chat_params = req.build_chat_params(None, "auto").with_defaults(dict(tools=None, tokenize=False))
        _, (engine_input,) = renderer.render_chat([messages], chat_params, req.build_tok_params(model_config))
        return list(engine_input["prompt_token_ids"])

    msgs = conversation(random.Random(3), turns=3)
    examples = encode_chat(tok, msgs, max_len=512)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(examples) == len(turns) == 3
    for e, i in zip(examples, turns):
        want = vllm_prompt(msgs[:i])
        assert e.input_ids[:e.prompt_length] == want == chat_prompt_ids(tok, msgs[:i])
    assert chat_prompt_ids(tok, msgs) == vllm_prompt(msgs)  # a conversation ending with the assistant too


def test_long_chat_prompt_is_cut_from_the_left_keeping_bos(tok):
    msgs = conversation(random.Random(1), turns=4)
    full = encode_chat(tok, msgs, max_len=512)[-1]
    cut = encode_chat(tok, msgs, max_len=24)[-1]
    response = full.input_ids[full.prompt_length:]
    assert len(cut.input_ids) == 24 and cut.input_ids[cut.prompt_length:] == response
    assert cut.input_ids[0] == tok.bos_token_id
    assert cut.input_ids[1:cut.prompt_length] == full.input_ids[full.prompt_length - cut.prompt_length + 1:
                                                               full.prompt_length]


def test_tokenizer_without_chat_template_is_a_clear_error(tok, tmp_path):
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    msgs = conversation(random.Random(0))
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        encode_chat(bare, msgs, 64)
    with pytest.raises(DataError, match="chat template"):
        chat_prompt_ids(bare, msgs)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: chat records .* need a tokenizer with a chat template"):
        encode_records(bare, read_jsonl(path), 64)


def test_template_that_breaks_the_prefix_is_refused(tok, tmp_path):
    # The generation prompt opens a "thinking" block the rendered assistant turn does not have.
    odd = tok.__class__.from_pretrained(tok.name_or_path)
    odd.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>think:{% endif %}")
    msgs = conversation(random.Random(0))
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}] * 2)
    with pytest.raises(DataError, match=r"c\.jsonl:1: assistant message 2: the chat template does not render .*prefix"):
        encode_records(odd, read_jsonl(path), 64)


# -- end to end: trained on chat data, served through /v1/chat/completions ----------------------
MAX_TOKENS = 8


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def reference_tokens(model_dir: str, adapter: str | None, prompt_ids: list[int]) -> list[int]:
    """Greedy float32 tokens of the transformers reference (the base model when adapter is None)."""
    from vllm_pedro.hf.model import PedroModel

    base, _ = load_base_model(model_dir)
    base.generation_config.eos_token_id = None  # as the requests: ignore_eos, a fixed length
    ids = torch.tensor([prompt_ids])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    with torch.no_grad():
        model = base if adapter is None else PedroModel.from_pretrained(base, adapter)
        out = model.generate(ids, **kw)
    return out[0, len(prompt_ids):].tolist()


def test_tenant_trained_on_chat_answers_through_chat_completions(bos_model_dir, tok, tmp_path):
    pytest.importorskip("vllm")
    from vllm_pedro.cli import main
    from vllm_pedro.testing import free_port, start_server, stop_server, wait_ready

    rng = random.Random(0)
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation(rng)} for _ in range(24)])
    adapter = tmp_path / "tenant-chat"
    assert main(["train", "--model", bos_model_dir, "--train-file", train_file, "--output-dir", str(adapter),
                 "--max-steps", "12", "--batch-size", "8", "--lr", "1e-2", "--r", "8", "--max-len", "128",
                 "--no-progress"]) == 0
    metrics = json.load(open(adapter / "train_metrics.json"))
    assert metrics["train_examples"] == 48  # two assistant turns per conversation
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = start_server(bos_model_dir, {"tenant-chat": str(adapter)}, port, log_file=log)
    try:
        # The references while the server starts.
        asks = [conversation(random.Random(s), turns=t)[:-1] for s, t in ((10, 1), (11, 2))]  # end on a user turn
        prompts = [chat_prompt_ids(tok, m) for m in asks]
        ref = {name: [reference_tokens(bos_model_dir, path, p) for p in prompts]
               for name, path in (("tenant-chat", str(adapter)), ("base", None))}
        assert ref["tenant-chat"] != ref["base"]  # the tenant changes the answers: the comparison can fail
        try:
            wait_ready(proc, port, timeout=400)
        except Exception:
            log.flush()
            raise AssertionError("the server did not start:\n" + (tmp_path / "server.log").read_text()[-5000:])
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for name, model in (("tenant-chat", "tenant-chat"), ("base", bos_model_dir)):
            for messages, prompt, want in zip(asks, prompts, ref[name]):
                r = post_json(url, {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                                    "ignore_eos": True, "return_token_ids": True})
                assert r["model"] == model
                assert r["prompt_token_ids"] == prompt, (name, "the server prefilled another prompt")
                assert r["choices"][0]["token_ids"] == want, (name, messages)
    finally:
        stop_server(proc)
        log.close()
