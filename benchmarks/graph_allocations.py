#!/usr/bin/env python
"""Fresh buffers per model step in the code torch.compile generates: the bare model vs the
PEDRO engine, vLLM's compiled mode on the CPU (one Inductor graph for the whole model).

Each method runs in its own process with its own Inductor cache folder; one generate call
compiles the graph; then the generated wrapper (`def call(args)` of the output code) is
read: every `empty_strided_cpu(...)` is a buffer allocated fresh on each step, every
`# reuse` line a buffer handed on instead. Buffers whose size depends on the step's token
count (a size symbol such as s0) are the large ones: at a prefill step of ~4,000 tokens of
SmolLM2 they are 9-48 MiB each, and under glibc's default allocator every buffer of 32 MiB
or more is a fresh mmap whose pages fault on first write.

    python benchmarks/graph_allocations.py --model smollm2-135m \\
        --output-json benchmarks/results/graph_allocations_smollm2_135m_cpu.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE_SYMBOL = re.compile(r"\bs\d+\b")


def count_wrapper(code: str) -> dict:
    """Allocations and reuses in the `call` function of one Inductor output file."""
    m = re.search(r"\n(\s*)def call\((self, )?args\):", code)
    if not m:
        return {"allocations": 0, "token_sized_allocations": 0, "by_shape": {}, "reuses": 0, "extern_calls": 0,
                "pedro_ops": []}
    body = code[m.end():]
    end = re.search(rf"\n{m.group(1)}def |\n\S", body)  # the next method or top-level statement
    body = body[:end.start()] if end else body
    allocs = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", body)
    large = [a for a in allocs if SIZE_SYMBOL.search(a)]
    by_shape: dict[str, int] = {}
    for a in large:
        key = "[" + SIZE_SYMBOL.sub("T", a.replace(" ", "")) + "]"
        by_shape[key] = by_shape.get(key, 0) + 1
    return {"allocations": len(allocs), "token_sized_allocations": len(large), "by_shape": by_shape,
            "reuses": body.count("# reuse"), "extern_calls": len(re.findall(r"torch\.ops\.vllm\.\w+", body)),
            "pedro_ops": sorted(set(re.findall(r"torch\.ops\.vllm\.(pedro_\w+)", body)))}


def count_cache(cache: str) -> list[dict]:
    files = [f for f in glob.glob(os.path.join(cache, "**", "*.py"), recursive=True)
             if re.search(r"def call\((self, )?args\):", open(f, errors="replace").read())]
    return [count_wrapper(open(f).read()) | {"file": os.path.relpath(f, cache)} for f in files]


def one(method: str, model: str, cache: str, adapter_dir: str) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    common = dict(dtype="float32", max_num_seqs=16, max_model_len=512, enable_prefix_caching=False, seed=0)
    kw = {}
    if method == "bare":
        from vllm import LLM
        llm = LLM(model, **common)
    else:
        from vllm_pedro import LLM
        llm = LLM(model, enable_pedro=True, max_pedro_adapters=2, pedro_adapter_dir=adapter_dir, **common)
        kw = dict(pedro_request=["tenant-0", None])
    prompts = [TokensPrompt(prompt_token_ids=list(range(100, 300))), TokensPrompt(prompt_token_ids=list(range(5, 90)))]
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False, **kw)
    graphs = count_cache(cache)
    return {"method": method, "graphs": graphs,
            "allocations": sum(g["allocations"] for g in graphs),
            "token_sized_allocations": sum(g["token_sized_allocations"] for g in graphs),
            "reuses": sum(g["reuses"] for g in graphs),
            "by_shape": {k: sum(g["by_shape"].get(k, 0) for g in graphs) for g in graphs for k in g["by_shape"]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output-json", default=None)
    p.add_argument("--keep-code", default=None, help="copy each method's generated code into this folder")
    p.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print("RESULT=" + json.dumps(one(*args._one)))
        return 0
    sys.path.insert(0, os.path.dirname(HERE))
    from vllm_pedro.tools.bench import make_pedro_adapters, resolve_model, save_json

    work = tempfile.mkdtemp(prefix="graph-allocs-")
    model, label = resolve_model(args.model, work)
    adapters = make_pedro_adapters(model, 1, 16, ("q", "v", "up"), os.path.join(work, "adapters"), 0)
    results = {}
    variants = {"bare": {}, "pedro": {}, "pedro-trace": {"VLLM_PEDRO_COMPILED_SCALING": "trace"}}
    for method, env in variants.items():
        cache = os.path.join(work, f"inductor-{method}")
        proc = subprocess.run([sys.executable, __file__, "--_one", method.split("-")[0], model, cache, adapters],
                              capture_output=True, text=True, env={**os.environ, **env})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
        if proc.returncode or not line:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-4000:]}")
        results[method] = json.loads(line[0][len("RESULT="):])
        if args.keep_code:
            import shutil
            shutil.copytree(cache, os.path.join(args.keep_code, method), dirs_exist_ok=True)
    print(f"\n{label}: fresh buffers per model step in the generated code (vLLM compiled mode, CPU)")
    print(f"{'method':12} {'graphs':>6} {'allocations':>12} {'token-sized':>12} {'reuses':>7}  by shape")
    for m, r in results.items():
        shapes = " ".join(f"{k}:{v}" for k, v in sorted(r["by_shape"].items()))
        print(f"{m:12} {len(r['graphs']):>6} {r['allocations']:>12} {r['token_sized_allocations']:>12} "
              f"{r['reuses']:>7}  {shapes}")
    print("(pedro: the default, q/k/v scaled in place by the C++ op; pedro-trace: VLLM_PEDRO_COMPILED_SCALING=trace, "
          "the traced out-of-place product)")
    out = {"model": label, "results": results, "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    save_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
