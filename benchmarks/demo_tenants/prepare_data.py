"""Fetch BIG-bench (the bigbench==1.0.0 sdist, once) and write the demo tenants' data
splits with the quality study's code (benchmarks/quality/tasks.py: fixed seeded split,
its prompt formats).

    python benchmarks/demo_tenants/prepare_data.py DATA_DIR [TASK ...]

writes DATA_DIR/<task slug>/{train,dev,test}.jsonl and meta.json. Tasks: those of
benchmarks/quality/tasks.py (gem/e2e_nlg, multiemo/all_sentence_en, strategyqa) and
gem/common_gen (made here).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "quality"))

import tasks  # noqa: E402  (benchmarks/quality/tasks.py)

# The same split and caps as the quality study (benchmarks/quality/README.md): data seed 0,
# 70/10/20 by distinct input, train capped at 2000, dev at 100, test at 200.
SPLIT = dict(seed=0, max_train=2000, max_dev=100, max_test=200)
DEFAULT_TASKS = ["gem/e2e_nlg", "multiemo/all_sentence_en"]

# gem/common_gen (a set of concepts -> one sentence using them all) is not one of the quality
# study's tasks (tasks.TASKS), so its split and prompt are made here, the way tasks.build_splits
# makes e2e's: distinct inputs, sorted, shuffled with the seed, cut 70/10/20; train/dev hold
# one record per (input, reference), test one per input with all its references.
COMMON_GEN = "gem/common_gen"
COMMON_GEN_SLUG = "gem__common_gen"
COMMON_GEN_MAX_NEW_TOKENS = 48


def common_gen_prompt(concepts: str) -> str:
    return "Write one sentence that uses all of these concepts: " + ", ".join(concepts.split()) + "\nSentence:"


def prepare_common_gen(data_dir: str, sdist: str, seed: int = 0, fractions=(0.7, 0.1, 0.2),
                       max_train: int | None = None, max_dev: int | None = None, max_test: int | None = None) -> dict:
    import hashlib
    import random

    extracted = os.path.join(tasks.default_cache_dir(), "bigbench", "tasks")
    path = tasks.extract_tasks(sdist, [COMMON_GEN], extracted, progress=False)[COMMON_GEN]
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    task = tasks.load_task_json(path)
    groups: dict[str, list[str]] = {}
    for e in task["examples"]:
        refs = e["target"] if isinstance(e["target"], list) else [e["target"]]
        refs = [" ".join(t.split()) for t in refs if isinstance(t, str) and t.strip()]
        groups.setdefault(" ".join(e["input"].split()), []).extend(refs)
    groups = {k: list(dict.fromkeys(v)) for k, v in groups.items() if v}
    rng = random.Random(seed)
    inputs = sorted(groups)
    rng.shuffle(inputs)
    n_dev, n_test = round(len(inputs) * fractions[1]), round(len(inputs) * fractions[2])
    n_train = len(inputs) - n_dev - n_test
    parts = {"train": inputs[:n_train], "dev": inputs[n_train:n_train + n_dev], "test": inputs[n_train + n_dev:]}
    out_dir = os.path.join(data_dir, COMMON_GEN_SLUG)
    paths, counts = {}, {}
    for split, keys in parts.items():
        if split == "test":
            recs = [{"prompt": common_gen_prompt(k), "response": " " + groups[k][0], "input": k,
                     "references": groups[k]} for k in keys]
        else:
            recs = [{"prompt": common_gen_prompt(k), "response": " " + t, "input": k} for k in keys for t in groups[k]]
            rng.shuffle(recs)
        cap = {"train": max_train, "dev": max_dev, "test": max_test}[split]
        recs = recs[:cap] if cap is not None else recs
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        tasks.write_jsonl(paths[split], recs)
        counts[split] = len(recs)
    meta = {"task": COMMON_GEN, "kind": "generation", "seed": seed, "fractions": list(fractions),
            "source": os.path.abspath(path), "source_sha256": sha, "bigbench_version": tasks.BIGBENCH_VERSION,
            "counts": counts, "distinct_inputs": {s: len(k) for s, k in parts.items()}, "paths": paths,
            "max_new_tokens": COMMON_GEN_MAX_NEW_TOKENS}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def fetch_sdist() -> str:
    return tasks.fetch_bigbench(progress=False)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    data_dir, names = argv[0], argv[1:] or DEFAULT_TASKS
    sdist = fetch_sdist()
    for name in names:
        if name == COMMON_GEN:
            meta = prepare_common_gen(data_dir, sdist, **SPLIT)
        else:
            meta = tasks.prepare_task(name, data_dir, progress=False, **SPLIT)
        print(json.dumps({"task": meta["task"], "counts": meta["counts"], "source_sha256": meta["source_sha256"],
                          "dir": os.path.dirname(meta["paths"]["train"])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
