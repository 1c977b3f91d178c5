"""Scoring tenants with lm-evaluation-harness (`pip install 'lm-eval[api]==0.4.13'`) against a
running `vllm-pedro serve`: the harness's `local-completions` model sends each prompt as a
string to /v1/completions with "model": TENANT, so no lm-eval plugin is needed.

    # an lm-eval generate_until task from a JSONL of {"prompt", "response"} records (the
    # format `vllm-pedro train` reads), the target being the stripped response:
    python -m vllm_pedro.tools.lm_eval make-task test.jsonl --name my_task --out-dir tasks/ --max-gen-toks 16
    # several tenants (and the base model) on tasks, one lm-eval run each, a table at the end:
    python -m vllm_pedro.tools.lm_eval run --base-url http://127.0.0.1:8000 --models tenant-a smollm2-135m \\
        --tasks my_task --include-path tasks/ [--output-path out/]

The `lm_eval` CLI works the same with MODEL_ARGS below (see benchmarks/lm_eval/README.md).
Nothing here reaches a hub: no tokenizer is loaded (tokenizer_backend=none; the server
tokenizes), datasets and the hub are put offline, and task data come from local files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# generate_until against the server without a tokenizer: prompts go as strings, the server
# tokenizes them as it does for any client. (Loglikelihood tasks would need a tokenizer:
# add tokenizer=<local model dir>,tokenizer_backend=huggingface; not tested here.)
MODEL_ARGS = {"tokenizer_backend": "none", "tokenized_requests": False, "num_concurrent": 4, "max_retries": 3}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_args(model: str, base_url: str, **extra) -> dict:
    """local-completions model_args for `model` (a tenant's name, or the base model's served
    name) on the server at `base_url` (http://HOST:PORT, with or without /v1/completions)."""
    url = base_url.rstrip("/")
    if not url.endswith("/v1/completions"):
        url += "/v1/completions"
    return {"model": model, "base_url": url, **MODEL_ARGS, **extra}


def model_args_string(args: dict) -> str:
    """The `--model_args` form of model_args (commas in values are not supported by lm-eval)."""
    for k, v in args.items():
        if "," in str(v):
            raise ValueError(f"lm-eval cannot parse a comma in --model_args {k}={v!r}")
    return ",".join(f"{k}={v}" for k, v in args.items())


def task_config(name: str, data_file: str, *, max_gen_toks: int, until: list[str] | None = None,
                text_field: str = "prompt", target_field: str = "target", first_word: bool = False,
                ignore_case: bool = False, ignore_punctuation: bool = False, cache_dir: str | None = None) -> dict:
    """An lm-eval task config (the YAML's content): greedy generate_until on the JSONL
    `data_file` (split "test"), exact_match after stripping whitespace ("strip" filter) and,
    with `first_word`, on the first [A-Za-z]+ word alone ("first_word" filter: label tasks,
    the same rule as benchmarks/quality/tasks.py's accuracy when ignore_case is on). `until`
    [] stops at EOS or max_gen_toks only."""
    kwargs = {"data_files": {"test": data_file}}
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    filters = [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]
    if first_word:
        filters.append({"name": "first_word", "filter": [
            {"function": "regex", "regex_pattern": "[A-Za-z]+", "group_select": 0, "fallback": "[invalid]"},
            {"function": "take_first"}]})
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": kwargs, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{" + text_field + "}}",
        "doc_to_target": "{{" + target_field + "}}",
        "generation_kwargs": {"until": list(until or []), "max_gen_toks": max_gen_toks, "do_sample": False,
                              "temperature": 0.0},
        "filter_list": filters,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": ignore_case, "ignore_punctuation": ignore_punctuation}],
        "metadata": {"version": 1.0},
    }


def write_task(records: list[dict], out_dir: str, name: str, *, data_path: str | None = None, **config) -> str:
    """Write `out_dir/NAME.jsonl` (records with "prompt" and "target"; a "response" becomes the
    target, stripped) and `out_dir/NAME.yaml` (task_config; `data_path` is the data file as the
    YAML names it, default its absolute path). Returns the YAML's path."""
    import yaml

    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in records:
            r = dict(r)
            if "target" not in r:
                r["target"] = str(r["response"]).strip()
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    path = os.path.join(out_dir, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(task_config(name, data_path or os.path.abspath(data), **config), f, sort_keys=False,
                       allow_unicode=True)
    return path


def evaluate(base_url: str, models: list[str], tasks: list[str], include_path: str | None = None,
             log_samples: bool = True, limit: int | None = None, **extra_model_args) -> dict[str, dict]:
    """lm_eval.simple_evaluate with local-completions once per model; {model: its results}
    (results["results"][task]["exact_match,strip"], results["samples"][task] when logged). With
    `include_path`, only its tasks are indexed (lm-eval's ~200 built-in task folders are skipped)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    out = {}
    for m in models:
        out[m] = simple_evaluate(model="local-completions", model_args=model_args(m, base_url, **extra_model_args),
                                 tasks=list(tasks), task_manager=manager, log_samples=log_samples, limit=limit)
    return out


def table(results: dict[str, dict]) -> str:
    """A markdown table: one row per model, one column per (task, metric, filter)."""
    cols = []
    for res in results.values():
        for task, metrics in res["results"].items():
            cols += [(task, k) for k, v in metrics.items() if "," in k and "_stderr" not in k
                     and isinstance(v, (int, float)) and (task, k) not in cols]  # "metric,filter"
    head = "| model | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    for m, res in results.items():
        vals = [res["results"].get(t, {}).get(k) for t, k in cols]
        rows.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_pedro.tools.lm_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-task", help="an lm-eval task from a JSONL of {prompt, response} records")
    mk.add_argument("records")
    mk.add_argument("--name", required=True)
    mk.add_argument("--out-dir", required=True)
    mk.add_argument("--max-gen-toks", type=int, required=True)
    mk.add_argument("--until", nargs="*", default=[],
                    help="stop strings, \\n and \\t decoded (default: none, EOS and max-gen-toks only)")
    mk.add_argument("--first-word", action="store_true", help="also score the first word alone (label tasks)")
    mk.add_argument("--ignore-case", action="store_true")
    mk.add_argument("--ignore-punctuation", action="store_true")
    mk.add_argument("--limit", type=int, default=None, help="the first N records only")
    run = sub.add_parser("run", help="lm-eval for several models on a server, then a table")
    run.add_argument("--base-url", required=True, help="http://HOST:PORT of vllm-pedro serve")
    run.add_argument("--models", nargs="+", required=True, help="tenant names and/or the base model's name")
    run.add_argument("--tasks", nargs="+", required=True)
    run.add_argument("--include-path", default=None)
    run.add_argument("--limit", type=int, default=None)
    run.add_argument("--output-path", default=None, help="write each model's results (samples included) as JSON here")
    a = p.parse_args(argv)
    if a.cmd == "make-task":
        with open(a.records, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()][:a.limit]
        until = [u.replace("\\n", "\n").replace("\\t", "\t") for u in a.until]
        print(write_task(recs, a.out_dir, a.name, max_gen_toks=a.max_gen_toks, until=until,
                         first_word=a.first_word, ignore_case=a.ignore_case,
                         ignore_punctuation=a.ignore_punctuation))
        return 0
    results = evaluate(a.base_url, a.models, a.tasks, a.include_path, log_samples=bool(a.output_path), limit=a.limit)
    if a.output_path:
        os.makedirs(a.output_path, exist_ok=True)
        for m, res in results.items():
            with open(os.path.join(a.output_path, m.replace("/", "__") + ".json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
