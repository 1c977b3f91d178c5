"""What tests, the tiny demo and the CPU benchmarks build on: tiny random-weight models
(a Llama or Qwen2 config from transformers and a byte-level BPE tokenizer trained in a
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


def build_tiny_model(directory: str, arch: str = "llama", seed: int = 0, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 192, max_position_embeddings: int = 512) -> str:
    """Write a random-weight float32 model and its tokenizer to `directory` (idempotent).
    head_dim = hidden_size / num_heads must be one vLLM's CPU attention supports (32, 64, ...)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    os.makedirs(directory, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float32",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose llama or qwen2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
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
    from transformers import AutoModelForCausalLM

    from .config import PedroConfig
    from .hf.model import get_pedro_model

    from tqdm.auto import tqdm

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
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
