"""PEDRO vs LoRA vs IA3 on BIG-bench tasks: one command that trains and evaluates them all.

Every adapter is trained by `vllm_pedro.train.train` (same data, loop, optimiser, schedule,
steps and batch size); only the method and its size differ:

  lora-r4, lora-r16   peft LoRA on q_proj, v_proj (alpha = 2r)
  pedro~lora-r4/16    PEDRO (q, v, up; attention pooler; rational activation) with the
                      rank whose trainable parameter count (SPEC.md section 1 formula,
                      computed from the base model's shapes) is nearest that LoRA's,
                      and within 20% of it (else the run refuses)
  ia3                 peft IA3 (k_proj, v_proj, down_proj)
  base                the base model with the same prompts, no adapter

Each trained variant runs with every seed (default 0 1 2); the summary reports the
median (and min-max) over seeds. Test generation is greedy. PEDRO adapters are decoded
twice: by the vLLM plugin (`vllm_pedro.LLM(..., enable_pedro=True)`) and by the
transformers reference (`PedroModel.generate`); both sets of scores are reported with
the fraction of test prompts on which the two produced identical tokens. LoRA, IA3 and
base are decoded with transformers (peft); base also with vLLM.

Outputs (--out, default benchmarks/results/quality/): runs/<task>/<variant>/seed<k>.json
per run, summary.json, summary.md (markdown table) and quality.png (bar plot).

examples:
  python benchmarks/quality/run.py --tiny                           # seconds, synthetic data
  python benchmarks/quality/run.py --model ./SmolLM2-135M --tasks strategyqa \\
      --steps 300 --max-train 2000 --max-test 200

Set VLLM_ENABLE_V1_MULTIPROCESSING=0 and VLLM_CPU_KVCACHE_SPACE=1 on the CPU (this
script sets them when they are unset).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for _p in (REPO, HERE):  # the package checkout, and tasks.py beside this script
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_TASKS = ("gem/e2e_nlg", "multiemo/all_sentence_en", "strategyqa")
DEFAULT_LR = {"pedro": 1e-3, "lora": 1e-3, "ia3": 3e-3}
PRIMARY = {"generation": "rougeL", "classification": "accuracy"}


# -- parameter counts ----------------------------------------------------------------------
def lora_param_count(shapes, r: int, targets=("q", "v")) -> int:
    """peft LoRA on the given projections: r * (in + out) per projection and layer."""
    per_layer = sum(r * (shapes.hidden_size + shapes.width(t)) for t in targets)
    return shapes.num_layers * per_layer


def pedro_param_count(shapes, r: int, targets=("q", "v", "up"), pooler: str = "attention",
                      activation: str = "rational") -> int:
    """SPEC.md section 1, per layer: d*r + r + r*D + D + pooler + rational coefficients,
    D = sum of the target widths."""
    from vllm_pedro.generator import GELU_DENOMINATOR, GELU_NUMERATOR

    d = shapes.hidden_size
    out = sum(shapes.width(t) for t in targets)
    extra = (d if pooler == "attention" else 0) + \
        (len(GELU_NUMERATOR) + len(GELU_DENOMINATOR) if activation == "rational" else 0)
    return shapes.num_layers * (d * r + r + r * out + out + extra)


def match_pedro_rank(shapes, target: int, tolerance: float = 0.2, **kw) -> tuple[int, int]:
    """(r, count): the PEDRO rank whose parameter count is nearest `target`; raises when
    even the best is more than `tolerance` (relative) away."""
    best = None
    for r in range(1, 4096):
        n = pedro_param_count(shapes, r, **kw)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (r, n)
        if n > target:
            break
    r, n = best
    if abs(n - target) > tolerance * target:
        raise ValueError(f"no PEDRO rank within {tolerance:.0%} of {target} parameters "
                         f"(nearest: r={r} with {n}); the fixed per-layer cost is too large for this model")
    return r, n


def shapes_of_model_dir(model_dir: str):
    from transformers import AutoConfig

    from vllm_pedro.config import BaseShapes

    return BaseShapes.from_hf_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))


def build_variants(methods, lora_ranks, shapes, tolerance=0.2) -> list[dict]:
    """The variants to run, in table order."""
    out = []
    if "base" in methods:
        out.append({"variant": "base", "method": "base", "trained": False, "params_formula": 0})
    for lr_ in lora_ranks:
        n_lora = lora_param_count(shapes, lr_)
        if "lora" in methods:
            out.append({"variant": f"lora-r{lr_}", "method": "lora", "trained": True, "lora_r": lr_,
                        "params_formula": n_lora})
        for kind, bilevel in (("pedro", False), ("pedro-bilevel", True)):
            if kind in methods:
                r, n = match_pedro_rank(shapes, n_lora, tolerance)
                out.append({"variant": f"{'pedro-bl' if bilevel else 'pedro'}~lora-r{lr_}", "method": "pedro",
                            "bilevel": bilevel, "trained": True, "r": r, "params_formula": n,
                            "matched_to": f"lora-r{lr_}", "matched_params": n_lora, "param_ratio": n / n_lora})
    if "ia3" in methods:
        out.append({"variant": "ia3", "method": "ia3", "trained": True, "params_formula": None})
    return out


# -- generation ---------------------------------------------------------------------------
def eos_ids_of(tokenizer, model_dir: str) -> list[int]:
    ids = {tokenizer.eos_token_id}
    try:
        from transformers import GenerationConfig

        g = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
        ids |= set(g if isinstance(g, list) else [g])
    except Exception:
        pass
    return sorted(i for i in ids if i is not None)


def cut_at_eos(ids, eos_ids) -> list[int]:
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i]
    return ids


def prompt_token_ids(tokenizer, prompts) -> list[list[int]]:
    # Exactly how training encodes a prompt (vllm_pedro.data.encode_example).
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def hf_generate(model_dir: str, method: str, adapter_dir: str | None, prompt_ids, max_new_tokens: int,
                batch_size: int, dtype: str = "float32") -> list[list[int]]:
    """Greedy generation with transformers: PedroModel.generate, a peft model, or the base."""
    import torch

    from vllm_pedro.data import pad_token_id
    from vllm_pedro.hf.model import PedroModel
    from vllm_pedro.train import load_base_model

    model, tok = load_base_model(model_dir, dtype, "cpu")
    if method == "pedro":
        model = PedroModel.from_pretrained(model, adapter_dir)
    elif method in ("lora", "ia3"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    eos = eos_ids_of(tok, model_dir)
    pad = pad_token_id(tok)
    outs = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[s:s + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for row in gen[:, width:].tolist():
                outs.append(cut_at_eos(row, eos))
    del model
    gc.collect()
    return outs


class VllmEvaluator:
    """One vLLM engine (with PEDRO) for every adapter of the study."""

    def __init__(self, model_dir: str, max_rank: int, max_model_len: int, dtype: str = "float32"):
        from vllm_pedro.vllm import LLM

        self.model_dir = model_dir
        self.llm = LLM(model_dir, enable_pedro=True, max_pedro_adapters=2, max_pedro_rank=max(1, max_rank),
                       dtype=dtype, enforce_eager=True, max_model_len=max_model_len, max_num_seqs=16, seed=0)
        self._next_id = 1

    def generate(self, prompt_ids, max_new_tokens: int, eos_ids, adapter_dir: str | None = None,
                 name: str = "adapter") -> list[list[int]]:
        from vllm import SamplingParams

        from vllm_pedro.vllm import PedroRequest

        req = None
        if adapter_dir is not None:
            req = PedroRequest(f"{name}-{self._next_id}", self._next_id, os.path.abspath(adapter_dir))
            self._next_id += 1
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens, stop_token_ids=list(eos_ids))
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self.llm.generate(prompts, params, pedro_request=req, use_tqdm=False)
        res = []
        for o in outs:
            if getattr(o, "pedro_error", None):
                raise RuntimeError(f"vLLM PEDRO request failed: {o.pedro_error}")
            res.append(cut_at_eos(o.outputs[0].token_ids, eos_ids))
        return res

    def close(self):
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del self.llm
        gc.collect()


# -- the study ------------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_data(args, work: str) -> dict[str, dict]:
    import tasks

    metas = {}
    for t in args.tasks:
        spec = tasks.get_task(t)
        task_json = None
        if args.tiny:
            task_json = tasks.write_synthetic_task(spec.name, os.path.join(work, "synthetic"), n=args.tiny_examples,
                                                   seed=args.data_seed)
        elif args.bigbench_dir:
            task_json = os.path.join(args.bigbench_dir, spec.name, "task.json")
        metas[spec.name] = tasks.prepare_task(spec.name, os.path.join(work, "data"), seed=args.data_seed,
                                              max_train=args.max_train, max_dev=args.max_dev,
                                              max_test=args.max_test, task_json=task_json,
                                              progress=args.progress)
        log(f"data {spec.name}: {metas[spec.name]['counts']}")
    return metas


def variant_lr(args, variant) -> float:
    """The learning rate of a run without tuning (--lr overrides, else DEFAULT_LR)."""
    return args.lr.get(variant["method"], DEFAULT_LR[variant["method"]])


def train_one(args, model_dir, meta, variant, seed, adapter_dir, lr: float) -> dict:
    from vllm_pedro.train import TrainArgs, train

    m = variant["method"]
    ta = TrainArgs(model=model_dir, train_file=meta["paths"]["train"], bilevel=bool(variant.get("bilevel")),
                   dev_file=meta["paths"]["dev"] if meta["counts"].get("dev") else None,
                   output_dir=adapter_dir, method=m, r=variant.get("r", 16),
                   lora_r=variant.get("lora_r", 8), lora_alpha=2 * variant.get("lora_r", 8),
                   lr=lr, warmup_ratio=0.06, max_steps=args.steps, batch_size=args.batch_size,
                   grad_accum=args.grad_accum, max_len=args.max_len,
                   eval_steps=args.eval_steps or None, eval_batch_size=args.batch_size,
                   seed=seed, dtype=args.dtype, device="cpu", progress=args.progress)
    return train(ta)


def execute(args, runs, model_dir, tokenizer, eos, log_prefix: str) -> None:
    """Phase 1, run by run: train (or reuse a finished adapter), transformers eval, save.
    Phase 2: one vLLM engine (with PEDRO) decodes every PEDRO adapter's and the base's
    test prompts (dev runs are scored from transformers only)."""
    import tasks

    def complete(r):
        """Done before with the same settings (else it is redone)."""
        if not os.path.isfile(r["json"]):
            return False
        with open(r["json"]) as f:
            old = json.load(f)
        r["result"] = old
        return old.get("complete", False) and old.get("fingerprint") == json.loads(json.dumps(r["fingerprint"]))

    done = [complete(r) for r in runs]  # (loads each finished run's result)
    todo = [] if args.summarize_only else [r for r, d in zip(runs, done) if args.overwrite or not d]
    log(f"{log_prefix}: {len(runs)} runs, {len(todo)} to do")
    for i, r in enumerate(todo):
        v, spec = r["variant"], r["spec"]
        res = r["result"] = {"task": r["task"], "variant": v["variant"], "method": v["method"], "seed": r["seed"],
                             "phase": r["phase"], "lr": r["lr"], "model": model_dir, "variant_config": v,
                             "complete": False, "fingerprint": r["fingerprint"],
                             "data": {k: r["meta"][k] for k in ("counts", "seed", "source_sha256")},
                             "args": {k: x for k, x in vars(args).items()}}
        where = f"[{log_prefix} {i + 1}/{len(todo)}] {r['task']} {v['variant']} lr {r['lr']:g} seed {r['seed']}"
        if v["trained"]:
            metrics_path = os.path.join(r["adapter"], "train_metrics.json")
            m = None
            if os.path.isfile(metrics_path) and not args.overwrite:
                with open(metrics_path) as f:
                    m = json.load(f)
                if m.get("fingerprint") != json.loads(json.dumps(r["adapter_fingerprint"])):
                    m = None  # trained with other settings: train again
                else:
                    log(f"reuse adapter {where}: {r['adapter']}")
            if m is None:
                log(f"train {where}")
                m = train_one(args, model_dir, r["meta"], v, r["seed"], r["adapter"], r["lr"])
                m["fingerprint"] = r["adapter_fingerprint"]
                write_json(metrics_path, m)
            res["train"] = {k: m.get(k) for k in ("steps", "best_dev_loss", "best_step", "initial_dev_loss",
                                                  "final_train_loss", "trainable_params", "wall_time_s",
                                                  "stopped_early", "train_examples", "bilevel")}
            res["train"]["lr"] = m["args"]["lr"]
            res["trainable_params"] = m["trainable_params"]
            if v["params_formula"] is not None and m["trainable_params"] != v["params_formula"]:
                raise RuntimeError(f"{v['variant']}: trainable parameters {m['trainable_params']} differ from "
                                   f"the formula's {v['params_formula']}")
        else:
            res["trainable_params"] = 0
        t = time.perf_counter()
        hf_bs = args.pedro_hf_batch_size if v["method"] == "pedro" and r["phase"] == "test" else args.hf_batch_size
        ids = hf_generate(model_dir, v["method"], r["adapter"] if v["trained"] else None, r["pids"],
                          spec.max_new_tokens, hf_bs, args.dtype)
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        res["hf_token_ids"] = ids
        res["scores_hf"] = tasks.score(r["task"], texts, r["test"])
        res["eval_hf_s"] = time.perf_counter() - t
        res["predictions_hf"] = texts[:args.keep_predictions]
        needs_vllm = v["method"] in ("pedro", "base") and not args.no_vllm and r["phase"] == "test"
        if not needs_vllm:
            res["complete"] = True
            if v["method"] in ("pedro", "base") and r["phase"] == "test":
                res["scores_vllm"], res["vllm_skipped"] = None, "--no-vllm"
        write_json(r["json"], res)
        log(f"eval hf {where}: {res['scores_hf']}")

    vllm_todo = [r for r in todo if not r["result"]["complete"]]
    if not vllm_todo:
        return
    max_rank = max([r["variant"].get("r", 1) for r in vllm_todo])
    longest = max(len(p) for r in vllm_todo for p in r["pids"])
    max_len = max(r["spec"].max_new_tokens for r in vllm_todo) + longest + 8
    t = time.perf_counter()
    ev = VllmEvaluator(model_dir, max_rank, max_model_len=max_len, dtype=args.dtype)
    log(f"vLLM engine up in {time.perf_counter() - t:.1f}s")
    try:
        for r in vllm_todo:
            v, spec, res = r["variant"], r["spec"], r["result"]
            t = time.perf_counter()
            ids = ev.generate(r["pids"], spec.max_new_tokens, eos, r["adapter"] if v["trained"] else None,
                              name=v["variant"])
            texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
            res["scores_vllm"] = tasks.score(r["task"], texts, r["test"])
            res["eval_vllm_s"] = time.perf_counter() - t
            res["predictions_vllm"] = texts[:args.keep_predictions]
            hf_ids = res["hf_token_ids"]
            same = [a == b for a, b in zip(ids, hf_ids)]
            res["vllm_hf_agreement"] = {
                "n": len(same), "identical": sum(same), "rate": sum(same) / max(1, len(same)),
                "mismatches": [{"index": i, "hf": hf_ids[i], "vllm": ids[i]}
                               for i, s in enumerate(same) if not s][:5]}
            res["complete"] = True
            write_json(r["json"], res)
            msg = (f"eval vllm {r['task']} {v['variant']} seed {r['seed']}: {res['scores_vllm']} "
                   f"(identical to transformers on {sum(same)}/{len(same)})")
            log(msg if all(same) else "WARNING: vLLM and transformers disagree: " + msg)
    finally:
        ev.close()


def choose_learning_rates(dev_runs) -> dict:
    """task -> variant -> {"chosen_lr", "by_lr": {lr: {primary metric, dev loss}}}: the rate
    with the best dev primary metric, ties broken by the lower dev loss, then the lower rate."""
    import tasks

    out: dict = {}
    for r in dev_runs:
        res = r["result"]
        metric = PRIMARY[tasks.get_task(r["task"]).kind]
        entry = out.setdefault(r["task"], {}).setdefault(r["variant"]["variant"], {"metric": metric, "by_lr": {}})
        entry["by_lr"][f"{r['lr']:g}"] = {"lr": r["lr"], metric: res["scores_hf"][metric],
                                          "dev_loss": res["train"]["best_dev_loss"],
                                          "train_s": res["train"]["wall_time_s"]}
    for variants in out.values():
        for entry in variants.values():
            best = max(entry["by_lr"].values(),
                       key=lambda e: (e[entry["metric"]], -(e["dev_loss"] if e["dev_loss"] is not None else 0),
                                      -e["lr"]))
            entry["chosen_lr"] = best["lr"]
    return out


def run_study(args) -> dict:
    import torch

    import tasks

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out_dir = os.path.abspath(args.out)
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)

    if args.tiny:
        from vllm_pedro.testing import build_tiny_model

        model_dir = build_tiny_model(os.path.join(work, "tiny-model"), arch="llama", seed=0)
    else:
        if not args.model:
            raise SystemExit("give --model DIR (a local transformers model directory) or --tiny")
        model_dir = resolve_model(args.model)
    shapes = shapes_of_model_dir(model_dir)
    variants = build_variants(args.methods, args.lora_ranks, shapes, args.param_tolerance)
    for v in variants:
        if v["method"] == "pedro":
            log(f"{v['variant']}: r={v['r']}, {v['params_formula']:,} params vs {v['matched_params']:,} "
                f"({v['param_ratio']:.3f}x)")
    metas = prepare_data(args, work)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eos = eos_ids_of(tokenizer, model_dir)

    def plan(task_name, v, seed, lr, phase):
        """One run: train (or reuse) the adapter of (v, seed, lr), score it on the dev set
        (phase "dev": choosing the learning rate) or on the test set (phase "test")."""
        meta = metas[task_name]
        spec = tasks.get_task(task_name)
        if args.max_new_tokens:
            spec = dataclasses.replace(spec, max_new_tokens=min(spec.max_new_tokens, args.max_new_tokens))
        records = tasks.read_records(meta["paths"][phase])
        tag = "seed-none" if seed is None else f"seed{seed}"
        fingerprint = {"model": os.path.abspath(model_dir), "variant": v, "seed": seed,
                       "data": {k: meta[k] for k in ("counts", "seed", "source_sha256")},
                       "max_new_tokens": spec.max_new_tokens, "dtype": args.dtype}
        if v["trained"]:
            fingerprint["train"] = {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                                    "max_len": args.max_len, "lr": lr, "eval_steps": args.eval_steps}
        name = f"dev-lr{lr:g}" if phase == "dev" else tag
        adapter = os.path.join(work, "adapters", spec.slug, v["variant"], f"lr{lr:g}" if lr else "-", tag)
        return {"task": task_name, "spec": spec, "meta": meta, "test": records, "phase": phase, "lr": lr,
                "pids": prompt_token_ids(tokenizer, [r["prompt"] for r in records]), "variant": v, "seed": seed,
                "fingerprint": {**fingerprint, "phase": phase}, "adapter_fingerprint": fingerprint,
                "json": os.path.join(out_dir, "runs", spec.slug, v["variant"], f"{name}.json"), "adapter": adapter}

    # Phase "dev" (with --lr-grid): every trained variant at every learning rate of the one
    # shared grid, seed --tune-seed, scored on the dev set; each keeps the best (primary
    # metric, then dev loss). Phase "test": every variant at its rate, every seed, test set.
    tuning = None
    if args.lr_grid:
        dev_runs = [plan(t, v, args.tune_seed, lr, "dev") for t in metas for v in variants if v["trained"]
                    for lr in args.lr_grid]
        execute(args, dev_runs, model_dir, tokenizer, eos, log_prefix="tune")
        tuning = choose_learning_rates(dev_runs)
        write_json(os.path.join(out_dir, "tuning.json"), tuning)
    runs = [plan(t, v, seed, (tuning[t][v["variant"]]["chosen_lr"] if tuning else variant_lr(args, v))
                 if v["trained"] else 0.0, "test")
            for t in metas for v in variants for seed in (args.seeds if v["trained"] else [None])]
    execute(args, runs, model_dir, tokenizer, eos, log_prefix="test")

    summary = summarize(out_dir, [r["json"] for r in runs], variants, args, model_dir, shapes, metas, tuning)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(f"done in {summary['wall_time_s']:.0f}s: {os.path.join(out_dir, 'summary.md')}")
    return summary


def resolve_model(name: str) -> str:
    """A local model directory, or a model name vllm_pedro.tools.models fetches (e.g. smollm2-135m)."""
    if os.path.isdir(name):
        return name
    try:
        from vllm_pedro.tools import models
    except ImportError as e:
        raise SystemExit(f"--model {name!r} is not a directory and vllm_pedro.tools.models is not available ({e})")
    return str(models.resolve_model(name))


def _stats(vals):
    vals = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def majority_baseline(meta: dict) -> dict | None:
    """Classification: the test accuracy (x100) of always answering the most frequent
    training label, the floor a trained adapter has to beat."""
    from collections import Counter

    import tasks

    if meta.get("kind") != "classification":
        return None
    train = Counter(r["label"] for r in tasks.read_records(meta["paths"]["train"]))
    label = train.most_common(1)[0][0]
    test = [r["label"] for r in tasks.read_records(meta["paths"]["test"])]
    return {"label": label, "accuracy": 100.0 * sum(t == label for t in test) / len(test)}


def summarize(out_dir, json_paths, variants, args, model_dir, shapes, metas=None, tuning=None) -> dict:
    import tasks

    results = []
    for p in json_paths:
        if os.path.isfile(p):
            with open(p) as f:
                results.append(json.load(f))
    order = [v["variant"] for v in variants]
    rows = []
    for task_name in dict.fromkeys(r["task"] for r in results):
        spec = tasks.get_task(task_name)
        for vname in order:
            rs = [r for r in results if r["task"] == task_name and r["variant"] == vname]
            if not rs:
                continue
            v = rs[0]["variant_config"]
            row = {"task": task_name, "variant": vname, "method": v["method"], "r": v.get("r"),
                   "lora_r": v.get("lora_r"), "trainable_params": rs[0]["trainable_params"],
                   "param_ratio": v.get("param_ratio"), "seeds": [r["seed"] for r in rs], "metrics": {}}
            for metric in spec.metrics:
                row["metrics"][metric] = {
                    "hf": _stats([(r.get("scores_hf") or {}).get(metric) for r in rs]),
                    "vllm": _stats([(r.get("scores_vllm") or {}).get(metric) for r in rs])}
            ag = [r["vllm_hf_agreement"] for r in rs if r.get("vllm_hf_agreement")]
            if ag:
                row["agreement"] = {"identical": sum(a["identical"] for a in ag), "n": sum(a["n"] for a in ag)}
            row["complete"] = all(r.get("complete") for r in rs)
            row["best_dev_loss"] = _stats([(r.get("train") or {}).get("best_dev_loss") for r in rs])
            row["train_s"] = _stats([(r.get("train") or {}).get("wall_time_s") for r in rs])
            row["lr"] = (rs[0].get("train") or {}).get("lr")
            row["data_counts"] = rs[0]["data"]["counts"]
            rows.append(row)
    summary = {"model": model_dir, "shapes": shapes.__dict__, "tiny": args.tiny, "steps": args.steps,
               "tune_seed": args.tune_seed,
               "batch_size": args.batch_size, "seeds": args.seeds, "lr": {**DEFAULT_LR, **args.lr},
               "rows": rows, "lr_grid": args.lr_grid, "tuning": tuning,
               "majority_baseline": {t: majority_baseline(m) for t, m in (metas or {}).items()}}
    os.makedirs(out_dir, exist_ok=True)
    write_markdown(os.path.join(out_dir, "summary.md"), summary)
    try:
        plot(os.path.join(out_dir, "quality.png"), summary)
    except Exception as e:  # the plot is a convenience; never lose the numbers for it
        log(f"plot failed: {e}")
    return summary


def _fmt(s):
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.1f}"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def write_markdown(path: str, summary: dict) -> None:
    import tasks

    lines = [f"# PEDRO vs LoRA vs IA3: quality ({'tiny synthetic smoke run' if summary['tiny'] else 'BIG-bench'})",
             "", f"Model: `{summary['model']}`; {summary['steps']} steps x batch {summary['batch_size']}; "
             f"seeds {summary['seeds']}; " + ("learning rate per variant chosen on the dev set (last section)."
                                              if summary.get("tuning") else f"lr {summary['lr']}."),
             "Scores x100, median over seeds (min-max). `hf`: transformers generation, `vllm`: the vLLM "
             "plugin (greedy). Agreement: test prompts whose vLLM tokens equal the transformers tokens.", ""]
    for task_name in dict.fromkeys(r["task"] for r in summary["rows"]):
        spec = tasks.get_task(task_name)
        metrics = spec.metrics
        task_rows = [r for r in summary["rows"] if r["task"] == task_name]
        counts = task_rows[0].get("data_counts") or {}
        lines += [f"## {task_name}", "",
                  "examples: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "; primary metric: "
                  f"{PRIMARY[spec.kind]}; `PEDRO - LoRA`: median PEDRO ({PRIMARY[spec.kind]}, vLLM) minus the "
                  "median of the LoRA it is matched to; `train s`: median training wall time per run." + (
                      f" Always answering the most frequent training label ({maj['label']!r}) scores "
                      f"{maj['accuracy']:.1f}." if (maj := summary.get("majority_baseline", {}).get(task_name)) else ""),
                  "",
                  "| variant | rank | lr | trainable params | vs LoRA | " + " | ".join(
                      f"{m} hf | {m} vllm" for m in metrics) + " | PEDRO - LoRA | vLLM = HF | best dev loss | train s |",
                  "|---|---|---|---|---|" + "---|---|" * len(metrics) + "---|---|---|---|"]
        by_name = {r["variant"]: r for r in task_rows}

        def primary(row):
            m = row["metrics"][PRIMARY[spec.kind]]
            s_ = m["vllm"] if row["method"] == "pedro" and m["vllm"] else m["hf"]
            return s_["median"] if s_ else None

        for row in task_rows:
            rank = row["r"] if row["method"] == "pedro" else row["lora_r"]
            ratio = f"{row['param_ratio']:.2f}x" if row.get("param_ratio") else "-"
            ag = row.get("agreement")
            cells = [row["variant"] + ("" if row.get("complete", True) else " (incomplete)"), str(rank or "-"),
                     f"{row['lr']:g}" if row.get("lr") else "-", f"{row['trainable_params']:,}", ratio]
            for m in metrics:
                cells += [_fmt(row["metrics"][m]["hf"]), _fmt(row["metrics"][m]["vllm"])]
            matched = by_name.get(row["variant"].partition("~")[2]) if row["method"] == "pedro" else None
            gap = "-"
            if matched and primary(row) is not None and primary(matched) is not None:
                gap = f"{primary(row) - primary(matched):+.1f}"
            cells += [gap, f"{ag['identical']}/{ag['n']}" if ag else "-",
                      f"{row['best_dev_loss']['median']:.3f}" if row.get("best_dev_loss") else "-",
                      f"{row['train_s']['median']:.0f}" if row.get("train_s") else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("tuning"):
        grid = [f"{x:g}" for x in summary["lr_grid"]]
        lines += ["## Learning rates chosen on the dev set", "",
                  f"One shared grid ({', '.join(grid)}), seed {summary.get('tune_seed', 0)}, the same steps for "
                  "every method; each cell: dev primary metric (dev loss). **Bold**: the rate kept (best dev "
                  "metric, ties by dev loss). The test runs above use the kept rate; nothing was chosen on test.", ""]
        for task_name, by_variant in summary["tuning"].items():
            lines += [f"### {task_name}", "", "| variant | " + " | ".join(f"lr {g}" for g in grid) + " |",
                      "|---|" + "---|" * len(grid)]
            for vname, entry in by_variant.items():
                cells = []
                for g in grid:
                    e = entry["by_lr"].get(g)
                    if e is None:
                        cells.append("-")
                        continue
                    txt = f"{e[entry['metric']]:.1f} ({e['dev_loss']:.3f})"
                    cells.append(f"**{txt}**" if e["lr"] == entry["chosen_lr"] else txt)
                lines.append(f"| {vname} | " + " | ".join(cells) + " |")
            lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import tasks

    panels = [(t, m) for t in dict.fromkeys(r["task"] for r in summary["rows"]) for m in tasks.get_task(t).metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.2 * len(panels)), 3.8), squeeze=False)
    for ax, (t, m) in zip(axes[0], panels):
        rows = [r for r in summary["rows"] if r["task"] == t]
        names, med, lo, hi, pts = [], [], [], [], []
        for r in rows:
            s = r["metrics"][m]["vllm"] if r["method"] == "pedro" and r["metrics"][m]["vllm"] else r["metrics"][m]["hf"]
            if s is None:
                continue
            names.append(r["variant"])
            med.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            pts.append(s["values"])
        colors = ["#888888" if n == "base" else "#ff9896" if n.startswith("pedro-bl") else "#d62728" if n.startswith("pedro") else
                  "#1f77b4" if n.startswith("lora") else "#2ca02c" for n in names]
        x = range(len(names))
        ax.bar(x, med, yerr=[lo, hi], color=colors, capsize=3)
        for i, vals in enumerate(pts):
            ax.scatter([i] * len(vals), vals, s=8, color="black", zorder=3)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, max([1.0] + [m_ + h for m_, h in zip(med, hi)]) * 1.15)
        maj = (summary.get("majority_baseline") or {}).get(t)
        if maj and m == "accuracy":
            ax.axhline(maj["accuracy"], color="black", linestyle="--", linewidth=0.8,
                       label=f"always {maj['label']!r}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{t}: {m}", fontsize=9)
    fig.suptitle("median over seeds (bars: min-max; PEDRO scored from vLLM generations)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------
def _lr_overrides(values) -> dict:
    out = {}
    for v in values or []:
        k, _, x = v.partition("=")
        if k not in DEFAULT_LR or not x:
            raise argparse.ArgumentTypeError(f"--lr takes METHOD=VALUE with METHOD in {sorted(DEFAULT_LR)}, got {v!r}")
        out[k] = float(x)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model directory (or a name vllm_pedro.tools.models can fetch)")
    p.add_argument("--tiny", action="store_true", help="tiny random model + synthetic BIG-bench-format data")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--methods", nargs="+", default=["base", "lora", "pedro", "ia3"],
                   choices=["base", "lora", "pedro", "pedro-bilevel", "ia3"],
                   help="pedro-bilevel: PEDRO with bi-level optimisation of its rational activations")
    p.add_argument("--lora-ranks", nargs="+", type=int, default=[4, 16])
    p.add_argument("--param-tolerance", type=float, default=0.2)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--eval-steps", type=int, default=0, help="dev evaluation every N steps (0: at the end)")
    p.add_argument("--lr-grid", nargs="+", type=float, default=None, metavar="LR",
                   help="tune: train every variant at each of these learning rates (seed --tune-seed), keep "
                        "the rate with the best dev score, then run the seeds at it on the test set")
    p.add_argument("--tune-seed", type=int, default=0, help="the seed of the learning-rate runs")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                   help=f"learning rate overrides (defaults {DEFAULT_LR})")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-dev", type=int, default=200)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--bigbench-dir", help="a folder of extracted BIG-bench tasks (<task>/task.json) to use "
                                          "instead of downloading the sdist")
    p.add_argument("--tiny-examples", type=int, default=24, help="--tiny: synthetic examples per task")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (default per task: e2e 64, classification 4)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hf-batch-size", type=int, default=8, help="transformers generation batch (LoRA, IA3, base)")
    p.add_argument("--pedro-hf-batch-size", type=int, default=1,
                   help="transformers generation batch for PEDRO (1: no padding, the exact reference)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--keep-predictions", type=int, default=20, help="generations kept per run JSON")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/quality, "
                                               "with --tiny: benchmarks/results/quality/tiny)")
    p.add_argument("--work-dir", default=None, help="data splits, adapters, tiny model (default: "
                                                    "~/.cache/vllm_pedro/quality[-tiny])")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose JSON exists")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing; rebuild summary.md/json and the plot from the run JSONs there are")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.lr = _lr_overrides(args.lr)
    if args.tiny:
        for k, v in (("steps", 30), ("max_len", 128)):
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results", "quality", *(["tiny"] if args.tiny else []))
    if args.work_dir is None:
        from tasks import default_cache_dir

        args.work_dir = os.path.join(default_cache_dir(), "quality-tiny" if args.tiny else "quality")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run_study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
