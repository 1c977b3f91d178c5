#!/usr/bin/env python
"""Multi-tenant decode at the transformers level (for the GPU machine, where there is no
vLLM): bare model vs PEDRO vs unmerged multi-LoRA, same decode loop, tokens/s.

A batch of B requests from N tenants (round-robin) is prefilled once and then decoded
token by token (greedy, KV cache, no early stop). Methods:

  bare   the model alone;
  pedro  N tenants' PEDRO generators run on each request's prompt in the prefill pass and
         write one vector row per request (slot = request); every forward then scales the
         q_proj / v_proj / up_proj outputs with vllm_pedro.ops.scale_ through forward hooks,
         indexed by a token -> slot map (one launch per layer and target for the whole batch;
         HF has separate q/k/v, so scale_ on each, not the fused scale_qkv_);
  lora   N tenants' rank-r LoRA (A, B) stacked per module; every forward adds
         s * (x A[idx]) B[idx] through forward hooks, a batched gather-matmul (torch.bmm of
         per-token gathered A and B): unmerged multi-LoRA without punica/SGMV kernels.

Prefill and decode are timed separately (CUDA-synchronised); decode tokens/s =
B * output_len / decode time, median over --repeats after a warm-up run.

    python benchmarks/hf_decode_compare.py --model random:llama-3-8b --dtype bfloat16 \\
        --batch-sizes 8 32 128 --num-tenants 1 8 32 --output-json benchmarks/results/hf_decode_h100.json
    python benchmarks/hf_decode_compare.py --smoke     # CPU, seconds: tiny model + correctness checks

--model: tiny (default: vllm_pedro.tiny shapes, random), random:SHAPE (a random-weight
Llama of a real model's shape: smollm2-135m, llama-3.2-1b, llama-2-7b, llama-3-8b; no
download, no tokenizer needed), or a local transformers model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import vllm_pedro  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(ROOT))
from vllm_pedro import PedroConfig, ops
from vllm_pedro.hf.model import find_decoder_layers, get_pedro_model

SHAPES = {  # LlamaConfig keyword arguments of real models (weights random)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256),
}
LORA_TARGETS = {"qv": ("q_proj", "v_proj"),
                "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
PEDRO_MODULES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
                 "up": ("mlp", "up_proj")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(spec: str, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec == "tiny" or spec.startswith("random:"):
        shape = "tiny" if spec == "tiny" else spec.split(":", 1)[1]
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if shape == "tiny":  # larger weights than the default init, so greedy ties are rare
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.1)
        label = f"random {shape}"
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device)
        label = spec
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, label


# ---- PEDRO --------------------------------------------------------------------------------
def make_pedro_tenants(model, n: int, rank: int, targets, seed: int, scale: float = 0.05):
    """n tenants' generators (a ModuleList per tenant, random non-zero weights) and the config."""
    tenants, config = [], None
    for t in range(n):
        pm = get_pedro_model(model, PedroConfig(r=rank, targets=tuple(targets)))
        gen = torch.Generator().manual_seed(seed * 7919 + t)
        with torch.no_grad():
            for name, p in pm.generators.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
                if name.split(".")[-1].startswith("rat_"):
                    p.add_(noise * 0.01)
                else:
                    p.copy_(noise * scale)
        pm.unload()
        tenants.append(pm.generators)
        config = pm.config
    return tenants, config


class PedroHooks:
    """Prefill: each layer's generators run on the prompt (q_proj's input = normed hidden
    states), per tenant, writing vectors[layer][request]. Every pass: q/v/up outputs
    scaled in place by ops.scale_ with the token -> slot map."""

    def __init__(self, model, tenants, config, tenant_of_request: list[int], dtype):
        self.layers = find_decoder_layers(model)
        self.tenants, self.columns = tenants, config.target_columns()
        self.B = len(tenant_of_request)
        dev = next(model.parameters()).device
        self.groups = [(t, torch.tensor([i for i, x in enumerate(tenant_of_request) if x == t], device=dev))
                       for t in sorted(set(tenant_of_request))]
        self.vectors = [torch.ones(self.B, config.out_size, dtype=dtype, device=dev) for _ in self.layers]
        self.slot_decode = torch.arange(self.B, dtype=torch.int32, device=dev)
        self.slot_idx = self.slot_decode
        self.prefill = False
        self.handles = []
        for li, layer in enumerate(self.layers):
            self.handles.append(layer.self_attn.q_proj.register_forward_pre_hook(self._generate(li)))
            for target, (col, _) in self.columns.items():
                parent, child = PEDRO_MODULES[target]
                mod = getattr(getattr(layer, parent), child)
                self.handles.append(mod.register_forward_hook(self._scale(li, col)))

    def start_prefill(self, prompt_len: int):
        self.prefill, self.T = True, prompt_len
        self.slot_idx = torch.arange(self.B, dtype=torch.int32, device=self.slot_decode.device
                                     ).repeat_interleave(prompt_len)

    def start_decode(self):
        self.prefill, self.slot_idx = False, self.slot_decode

    def _generate(self, li):
        def hook(module, args):
            if not self.prefill:
                return
            h = args[0]  # [B, T, d]
            for t, rows in self.groups:
                hs = h[rows].reshape(-1, h.shape[-1])
                seg = torch.arange(len(rows), device=h.device).repeat_interleave(self.T)
                self.vectors[li][rows] = self.tenants[t][li](hs, seg, len(rows)).to(self.vectors[li].dtype)
        return hook

    def _scale(self, li, col):
        def hook(module, args, out):
            flat = out.view(-1, out.shape[-1])
            ops.scale_(flat, self.vectors[li], self.slot_idx, col)
            return out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- multi-LoRA (unmerged, batched gather-matmul) ----------------------------------------
class LoraHooks:
    def __init__(self, model, n: int, rank: int, targets, tenant_of_request: list[int], dtype, seed: int,
                 alpha: float | None = None):
        dev = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed * 104729)
        self.scaling = (alpha or 2 * rank) / rank
        self.idx = torch.tensor(tenant_of_request, device=dev)
        self.token_idx = self.idx
        self.weights, self.handles = {}, []
        for layer in find_decoder_layers(model):
            for name in targets:
                mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                A = (torch.randn(n, mod.in_features, rank, generator=gen) * 0.05).to(dev, dtype)
                B = (torch.randn(n, rank, mod.out_features, generator=gen) * 0.02).to(dev, dtype)
                self.weights[mod] = (A, B)
                self.handles.append(mod.register_forward_hook(self._hook(A, B)))

    def start_prefill(self, prompt_len: int):
        self.token_idx = self.idx.repeat_interleave(prompt_len)

    def start_decode(self):
        self.token_idx = self.idx

    def _hook(self, A, B):
        def hook(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])  # [tokens, in]
            idx = self.token_idx
            # Chunked so a long prefill does not gather [tokens, in, r] all at once (decode: one chunk).
            delta = torch.cat([torch.bmm(torch.bmm(x[s:s + 1024].unsqueeze(1), A[idx[s:s + 1024]]),
                                         B[idx[s:s + 1024]]).squeeze(1) for s in range(0, x.shape[0], 1024)])
            return out + (self.scaling * delta).view(out.shape).to(out.dtype)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- the decode loop ----------------------------------------------------------------------
@torch.no_grad()
def generate(model, input_ids, output_len: int, hooks=None):
    """Greedy prefill + decode with a KV cache. Returns (tokens [B, output_len], prefill_s, decode_s)."""
    device = input_ids.device
    sync(device)
    t0 = time.perf_counter()
    if hooks:
        hooks.start_prefill(input_ids.shape[1])
    out = model(input_ids=input_ids, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    if hooks:
        hooks.start_decode()
    sync(device)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(output_len - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    sync(device)
    t2 = time.perf_counter()
    return torch.cat(toks, 1), t1 - t0, t2 - t1


def run_case(model, method, n, B, args, dtype, device, vocab):
    gen = torch.Generator().manual_seed(args.seed + B)
    ids = torch.randint(10, vocab, (B, args.input_len), generator=gen).to(device)
    tenant_of = [i % n for i in range(B)]
    hooks = None
    if method == "pedro":
        tenants, cfg = make_pedro_tenants(model, n, args.pedro_rank, args.pedro_targets, args.seed)
        hooks = PedroHooks(model, tenants, cfg, tenant_of, dtype)
    elif method == "lora":
        hooks = LoraHooks(model, n, args.lora_rank, LORA_TARGETS[args.lora_targets], tenant_of, dtype, args.seed)
    try:
        generate(model, ids, min(4, args.output_len), hooks)  # warm-up (kernels, allocator, Triton JIT)
        pre, dec, tokens = [], [], None
        for _ in range(args.repeats):
            tokens, p, d = generate(model, ids, args.output_len, hooks)
            pre.append(p)
            dec.append(d)
    finally:
        if hooks:
            hooks.remove()
    d = statistics.median(dec)
    return dict(method=method, num_tenants=n, batch_size=B, prefill_s=statistics.median(pre), decode_s=d,
                decode_tokens_per_s=B * (args.output_len - 1) / d if args.output_len > 1 else None,
                prefill_all_s=pre, decode_all_s=dec,
                backend=ops.backend_name(device) if method == "pedro" else None), tokens


# ---- smoke checks (CPU) ----------------------------------------------------------------
@torch.no_grad()
def smoke_checks(model, args, device) -> list[str]:
    """PEDRO through the hooks = vllm_pedro's transformers reference (PedroModel.generate)
    for each tenant; LoRA through the hooks = the merged weights."""
    msgs = []
    vocab = model.config.vocab_size
    n, B = 2, 4
    ids = torch.randint(10, vocab, (B, args.input_len), generator=torch.Generator().manual_seed(1)).to(device)
    tenant_of = [i % n for i in range(B)]
    tenants, cfg = make_pedro_tenants(model, n, args.pedro_rank, args.pedro_targets, args.seed, scale=0.3)
    hooks = PedroHooks(model, tenants, cfg, tenant_of, torch.float32)
    try:
        got, _, _ = generate(model, ids, args.output_len, hooks)
    finally:
        hooks.remove()
    for t in range(n):
        pm = get_pedro_model(model, cfg)
        pm.generators.load_state_dict(tenants[t].state_dict())
        rows = [i for i in range(B) if tenant_of[i] == t]
        ref = pm.generate(ids[rows], attention_mask=torch.ones_like(ids[rows]), max_new_tokens=args.output_len,
                          min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
        pm.unload()
        ref = ref[:, args.input_len:]
        if not torch.equal(ref, got[rows]):
            raise AssertionError(f"PEDRO hooks != PedroModel.generate for tenant {t}: {got[rows]} vs {ref}")
    bare, _, _ = generate(model, ids, args.output_len)
    if torch.equal(bare, got):
        raise AssertionError("PEDRO adapters did not change any token: the check is vacuous")
    msgs.append(f"pedro: {n} tenants x {B} requests match PedroModel.generate token for token")

    lora = LoraHooks(model, n, args.lora_rank, LORA_TARGETS[args.lora_targets], [0], torch.float32, args.seed)
    try:
        got_l, _, _ = generate(model, ids[:1], args.output_len, lora)  # request 0: tenant 0
        weights = {m: (A[0].clone(), B_[0].clone()) for m, (A, B_) in lora.weights.items()}
        scaling = lora.scaling
    finally:
        lora.remove()
    saved = {}
    for m, (A, B_) in weights.items():
        saved[m] = m.weight.data.clone()
        m.weight.data += scaling * (A @ B_).T
    try:
        ref_l, _, _ = generate(model, ids[:1], args.output_len)
    finally:
        for m, w in saved.items():
            m.weight.data = w
    if not torch.equal(ref_l, got_l):
        raise AssertionError(f"LoRA hooks != merged weights: {got_l} vs {ref_l}")
    msgs.append("lora: batched gather-matmul matches the merged-weight model")
    return msgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, random:SHAPE, or a local model directory")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128], help="requests decoded together")
    p.add_argument("--num-tenants", type=int, nargs="+", default=[1, 8, 32], help="tenant counts")
    p.add_argument("--methods", nargs="+", default=["bare", "pedro", "lora"], choices=("bare", "pedro", "lora"))
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--pedro-rank", type=int, default=16)
    p.add_argument("--pedro-targets", nargs="+", default=["q", "v", "up"])
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", choices=tuple(LORA_TARGETS), default="qv")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on the CPU, tiny sizes, plus correctness checks of both hook paths")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.dtype = "tiny", "cpu", "float32"
        args.batch_sizes, args.num_tenants, args.input_len, args.output_len, args.repeats = [4], [1, 2], 8, 4, 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, label = load_model(args.model, dtype, device)
    vocab = model.config.vocab_size
    checks = smoke_checks(model, args, device) if args.smoke else []
    for c in checks:
        print("[check]", c)
    results = []
    for B in args.batch_sizes:
        for n in args.num_tenants:
            if n > B:
                continue
            row = {}
            for method in args.methods:
                if method == "bare" and n != min(x for x in args.num_tenants if x <= B):
                    row["bare"] = next(r for r in results if r["method"] == "bare" and r["batch_size"] == B)
                    continue
                r, _ = run_case(model, method, n, B, args, dtype, device, vocab)
                results.append(r)
                row[method] = r
            bare = row.get("bare")
            line = f"B={B:4d} N={n:3d} "
            for m in args.methods:
                r = row[m]
                rel = f" ({r['decode_tokens_per_s'] / bare['decode_tokens_per_s']:.3f}x bare)" if bare and m != "bare" \
                    and r["decode_tokens_per_s"] else ""
                line += f"{m}: {r['decode_tokens_per_s'] or 0:9.1f} tok/s{rel}  "
            print(line, flush=True)
    summary = []
    for r in results:
        if r["method"] == "bare":
            continue
        bare = next(x for x in results if x["method"] == "bare" and x["batch_size"] == r["batch_size"])
        row = dict(batch_size=r["batch_size"], num_tenants=r["num_tenants"], method=r["method"],
                   decode_vs_bare=r["decode_tokens_per_s"] / bare["decode_tokens_per_s"] if r["decode_tokens_per_s"] else None,
                   prefill_vs_bare=bare["prefill_s"] / r["prefill_s"])
        summary.append(row)
    for s in summary:
        if s["method"] == "pedro":
            lo = next((x for x in summary if x["method"] == "lora" and x["batch_size"] == s["batch_size"]
                       and x["num_tenants"] == s["num_tenants"]), None)
            if lo and lo["decode_vs_bare"]:
                s["pedro_vs_lora_decode"] = s["decode_vs_bare"] / lo["decode_vs_bare"]
    env = dict(python=platform.python_version(), torch=torch.__version__, device=(
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"),
        torch_threads=torch.get_num_threads())
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    out = dict(benchmark="hf_decode_compare", model=label, dtype=str(dtype).replace("torch.", ""),
               config={k: v for k, v in vars(args).items() if k != "output_json"}, environment=env,
               checks=checks, results=results, summary=summary,
               notes=["requests spread round-robin over tenants; every request carries an adapter",
                      "decode tokens/s excludes the first token (made by the prefill pass)",
                      "LoRA: unmerged, per-token gathered A/B with torch.bmm (no punica/SGMV kernels)",
                      "eager transformers forward: at small batch on a GPU, Python launch overhead is a "
                      "large part of every method's time"])
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
        print("wrote", args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
