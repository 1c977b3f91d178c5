"""Check the demo tenants with the transformers reference: held-out test prompts, greedy,
base model (no adapter) vs tenant (PedroModel.from_pretrained(model, dir).generate).

    python benchmarks/demo_tenants/check.py --model MODEL_DIR --data-dir DATA_DIR \
        --tenant restaurant=DIR --tenant sentiment=DIR [--n 10] [--out results.json]

For each tenant the first --n records of its task's test split (a seeded shuffle made by
benchmarks/quality/tasks.py; never trained on, never used to pick an adapter) are generated
one prompt at a time (batch 1, no padding: what the demo sends), with the task's
max_new_tokens. Each output is checked against the tenant's format:

- label tasks (sentiment, yesno): the whole completion is exactly one label word
  (case-insensitive, an optional trailing "." allowed, nothing else);
- restaurant: a finished description (EOS before the token limit) of at least 6 words,
  one line, naming the restaurant (the `name:` attribute), ending in ".", "!" or "?";
- concepts: one finished line of 4-40 words (how many of the concepts it uses is
  reported as concept_coverage, not counted as format).

Writes --out (JSON: prompts, outputs, format flags, task scores) and prints a Markdown
report; --demo-prompts writes the first 5 prompts per tenant as the demo's prompt file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for _p in (REPO, os.path.join(REPO, "benchmarks", "quality")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import tasks  # noqa: E402  (benchmarks/quality/tasks.py)

# tenant name -> (BIG-bench task, data folder under --data-dir, max_new_tokens). The first two
# are the quality study's tasks (tasks.TASKS); gem/common_gen is prepared by prepare_data.py.
TENANTS = {"restaurant": ("gem/e2e_nlg", "gem__e2e_nlg", 64),
           "sentiment": ("multiemo/all_sentence_en", "multiemo__all_sentence_en", 4),
           "yesno": ("strategyqa", "strategyqa", 4),
           "concepts": ("gem/common_gen", "gem__common_gen", 48)}
LABELS = {"sentiment": ("positive", "negative", "neutral", "ambivalent"), "yesno": ("yes", "no")}


def concept_coverage(text: str, concepts: str) -> float:
    """Fraction of the concepts that appear in the text, crudely stemmed (a word starting
    with the concept minus its last letter, at least 3 letters: ride -> riding, shave -> shaves)."""
    words = re.findall(r"[a-z]+", text.lower())
    cs = concepts.split()
    hit = sum(any(w.startswith(c[:max(3, len(c) - 1)]) for w in words) for c in cs)
    return hit / max(1, len(cs))


def follows_format(name: str, text: str, finished: bool, record: dict) -> bool:
    if name in LABELS:
        m = re.fullmatch(r"\s*([A-Za-z]+)\.?\s*", text)
        return bool(m) and m.group(1).lower() in LABELS[name]
    s = text.strip()
    if name == "concepts":  # one finished sentence on one line
        return finished and bool(s) and "\n" not in s and 4 <= len(s.split()) <= 40
    # restaurant: a finished one-line description naming the restaurant
    if not finished or not s or "\n" in s or len(s.split()) < 6 or s[-1] not in ".!?":
        return False
    m = re.search(r"name:\s*([^,]+)", record["input"])
    return bool(m) and m.group(1).strip().lower() in s.lower()


def scores(name: str, task: str, texts: list[str], recs: list[dict]) -> dict:
    if name == "concepts":
        preds = [tasks.clean_generation(t) for t in texts]
        refs = [r["references"] for r in recs]
        return {"bleu": tasks.bleu(preds, refs), "rougeL": tasks.rouge_l(preds, refs),
                "concept_coverage": 100.0 * sum(concept_coverage(p, r["input"]) for p, r in zip(preds, recs))
                / max(1, len(recs))}
    return tasks.score(task, texts, recs)


def eos_ids_of(tokenizer, model_dir: str) -> list[int]:
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        g = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
        ids |= set(g if isinstance(g, list) else [g])
    except OSError:
        pass
    return sorted(i for i in ids if i is not None)


def generate(model_dir: str, adapter_dir: str | None, prompts: list[str], max_new_tokens: int):
    """Greedy completions (text, finished-before-the-limit) one prompt at a time; a fresh base
    model each call (PedroModel hooks its layers)."""
    import torch

    from vllm_pedro import PedroModel
    from vllm_pedro.data import pad_token_id
    from vllm_pedro.train import load_base_model

    model, tok = load_base_model(model_dir, "float32", "cpu")
    if adapter_dir is not None:
        model = PedroModel.from_pretrained(model, adapter_dir)
    model.eval()
    eos = eos_ids_of(tok, model_dir)
    outs = []
    with torch.no_grad():
        for p in prompts:
            # Exactly how training encodes a prompt (vllm_pedro.data.encode_example).
            ids = torch.tensor([tok(p, add_special_tokens=True)["input_ids"]])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad_token_id(tok))
            new = gen[0, ids.shape[1]:].tolist()
            finished = any(t in eos for t in new)
            if finished:
                new = new[:next(i for i, t in enumerate(new) if t in eos)]
            outs.append((tok.decode(new, skip_special_tokens=True), finished))
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True, help="prepare_data.py's output folder")
    p.add_argument("--tenant", action="append", required=True, metavar="NAME=DIR",
                   help=f"a tenant and its adapter folder; NAME one of {sorted(TENANTS)}")
    p.add_argument("--n", type=int, default=10, help="test prompts per tenant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--demo-prompts", default=None, help="write the first 5 prompts per tenant here (JSON)")
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    results = {"model": args.model, "n": args.n, "tenants": {}}
    for item in args.tenant:
        name, _, adapter = item.partition("=")
        task, slug, max_new_tokens = TENANTS[name]
        recs = tasks.read_records(os.path.join(args.data_dir, slug, "test.jsonl"))[:args.n]
        prompts = [r["prompt"] for r in recs]
        t0 = time.perf_counter()
        base = generate(args.model, None, prompts, max_new_tokens)
        tenant = generate(args.model, adapter, prompts, max_new_tokens)
        rows = []
        for r, (bt, bf), (tt, tf) in zip(recs, base, tenant):
            rows.append({"prompt": r["prompt"], "gold": r.get("references") or r.get("label"),
                         "base": bt, "base_finished": bf, "base_format": follows_format(name, bt, bf, r),
                         "tenant": tt, "tenant_finished": tf, "tenant_format": follows_format(name, tt, tf, r)})
        res = {"task": task, "adapter": os.path.abspath(adapter), "max_new_tokens": max_new_tokens,
               "tenant_format": sum(x["tenant_format"] for x in rows),
               "base_format": sum(x["base_format"] for x in rows), "total": len(rows),
               "scores_tenant": scores(name, task, [x["tenant"] for x in rows], recs),
               "scores_base": scores(name, task, [x["base"] for x in rows], recs),
               "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        results["tenants"][name] = res
        print(f"\n## {name} ({task}): tenant format {res['tenant_format']}/{res['total']}, "
              f"base format {res['base_format']}/{res['total']}; scores tenant {res['scores_tenant']}, "
              f"base {res['scores_base']}\n")
        print("| # | gold | base | tenant |\n|---|---|---|---|")
        for i, x in enumerate(rows):
            gold = x["gold"] if isinstance(x["gold"], str) else x["gold"][0]
            print(f"| {i} | {gold!r} | {x['base']!r} {'ok' if x['base_format'] else 'NO'} | "
                  f"{x['tenant']!r} {'ok' if x['tenant_format'] else 'NO'} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
            f.write("\n")
    if args.demo_prompts:
        demo = {name: [x["prompt"] for x in res["rows"][:5]] for name, res in results["tenants"].items()}
        with open(args.demo_prompts, "w") as f:
            json.dump(demo, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
