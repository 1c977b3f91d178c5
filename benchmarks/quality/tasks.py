"""BIG-bench tasks for the quality study: fetch, extract, split, format, score.

BIG-bench ships its tasks as JSON files inside the `bigbench==1.0.0` source
distribution (a 358 MB sdist on PyPI). We never install it: `fetch_bigbench` runs

    pip download --no-deps --no-binary :all: -d CACHE bigbench==1.0.0

once, and `extract_tasks` copies out only the `task.json` files we need (matched by
exact member name, written to paths we build ourselves: nothing in the archive decides
where a file lands).

`prepare_task` turns one task into fixed train/dev/test splits (a seeded shuffle) of
{"prompt", "response"} JSONL records, which `vllm_pedro.train` reads; test records also
carry "references" (e2e) or "label" (classification) for scoring.

- gem/e2e_nlg: data-to-text. 1000 examples but only ~213 distinct inputs, so the split
  is by distinct input: no test (or dev) input is ever seen in training. Test records
  are one per input with all its references. Scored with sacrebleu corpus BLEU (multi-
  reference) and rouge-score ROUGE-L F1 (best reference per example), both x100.
- multiemo/all_sentence_en: 4-class sentiment (positive, negative, neutral, ambivalent);
  the model generates the label word; accuracy. Duplicate sentences are dropped first so
  none crosses splits.
- strategyqa: yes/no questions; the model generates "yes" or "no"; accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
TASKS_ROOT = "bigbench/benchmark_tasks"  # inside the sdist's top folder


class TaskDataError(RuntimeError):
    """BIG-bench data that cannot be fetched, found or read; the message says what to do."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the BIG-bench task path under benchmark_tasks/, e.g. "gem/e2e_nlg"
    kind: str  # "generation" | "classification"
    labels: tuple[str, ...] = ()  # classification: the label words the model generates
    instruction: str = ""
    max_new_tokens: int = 8
    metrics: tuple[str, ...] = field(default=("accuracy",))

    @property
    def slug(self) -> str:
        return self.name.replace("/", "__")


TASKS: dict[str, TaskSpec] = {
    "gem/e2e_nlg": TaskSpec(
        "gem/e2e_nlg", "generation", max_new_tokens=64, metrics=("bleu", "rougeL"),
        instruction="There is a restaurant with the following attributes: "),
    "multiemo/all_sentence_en": TaskSpec(
        "multiemo/all_sentence_en", "classification",
        labels=("positive", "negative", "neutral", "ambivalent"), max_new_tokens=4,
        instruction="Determine whether the given opinion is positive, negative, neutral or ambivalent "
                    "in terms of its sentiment."),
    "strategyqa": TaskSpec(
        "strategyqa", "classification", labels=("yes", "no"), max_new_tokens=4,
        instruction="Answer the question with yes or no."),
}
# Short names accepted on command lines.
ALIASES = {"e2e_nlg": "gem/e2e_nlg", "e2e": "gem/e2e_nlg", "multiemo": "multiemo/all_sentence_en",
           "all_sentence_en": "multiemo/all_sentence_en"}


def get_task(name: str) -> TaskSpec:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (or {sorted(ALIASES)})")
    return TASKS[name]


def default_cache_dir() -> str:
    """$VLLM_PEDRO_CACHE or ~/.cache/vllm-pedro (the cache fetch-model uses too)."""
    from vllm_pedro.tools.models import cache_root

    return cache_root()


# -- fetch and extract -------------------------------------------------------------------
def fetch_bigbench(cache_dir: str | None = None, progress: bool = True) -> str:
    """Path of the bigbench sdist, downloaded with pip into `cache_dir`/bigbench once.

    pip >= 26.3 refuses the download even with --no-deps (it prepares the sdist's metadata
    and rejects a PyPI distribution that declares a direct-URL dependency; bigbench declares
    bleurt @ file://...), so a refusal is retried with the pip that `python -m venv` bundles
    (ensurepip: nothing extra is downloaded), which downloads it as before."""
    cache_dir = os.path.join(cache_dir or default_cache_dir(), "bigbench")
    path = os.path.join(cache_dir, SDIST_NAME)
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    if progress:
        print(f"downloading bigbench=={BIGBENCH_VERSION} (358 MB, once) into {cache_dir} ...", file=sys.stderr,
              flush=True)
    res, cmd = _pip_download(sys.executable, cache_dir, progress)
    if res.returncode != 0 or not os.path.isfile(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bigbench-pip-") as venv:
            made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
            if made.returncode == 0:
                res, cmd = _pip_download(os.path.join(venv, "bin", "python"), cache_dir, progress)
    if res.returncode != 0 or not os.path.isfile(path):
        detail = (res.stderr or "")[-800:] if not progress else "(see pip's output above)"
        raise TaskDataError(
            f"could not download bigbench=={BIGBENCH_VERSION} with `{' '.join(cmd)}` (exit {res.returncode}). "
            f"Is the package registry reachable (no network?)? You can also place {SDIST_NAME} in "
            f"{cache_dir} yourself. {detail}")
    return path


def _pip_download(python: str, dest: str, progress: bool):
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", dest,
           f"bigbench=={BIGBENCH_VERSION}"]
    try:
        # pip draws its own download progress bar on stderr when it is shown.
        return subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                              stderr=None if progress else subprocess.PIPE, text=True), cmd
    except OSError as e:
        raise TaskDataError(f"could not run pip to download bigbench: {e}") from e


def _member_name(top: str, task: str) -> str:
    return f"{top}/{TASKS_ROOT}/{task}/task.json"


def _safe_task_path(task: str) -> str:
    # Task names come from our registry, but check anyway: plain relative segments only.
    parts = task.split("/")
    if not parts or any(p in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts):
        raise ValueError(f"bad task name {task!r}")
    return os.path.join(*parts)


def extract_tasks(sdist: str, tasks: Sequence[str], dest: str, progress: bool = True) -> dict[str, str]:
    """Copy `<task>/task.json` for each task out of the sdist into `dest/<task>/task.json`
    (already extracted ones are kept). Only regular-file members with exactly the expected
    name are read; the output path is built from the task name, never from the archive."""
    out = {t: os.path.join(dest, _safe_task_path(t), "task.json") for t in tasks}
    missing = {t for t, p in out.items() if not os.path.isfile(p)}
    if not missing:
        return out
    top = f"bigbench-{BIGBENCH_VERSION}"
    wanted = {_member_name(top, t): t for t in missing}
    size = os.path.getsize(sdist)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="scanning bigbench sdist", dynamic_ncols=True)
    try:
        with open(sdist, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            last = 0
            for member in tar:
                if bar is not None:
                    pos = raw.tell()
                    bar.update(pos - last)
                    last = pos
                task = wanted.get(member.name)
                if task is None:
                    continue
                if not member.isfile():
                    raise TaskDataError(f"{member.name} in {sdist} is not a regular file")
                f = tar.extractfile(member)
                data = f.read()
                json.loads(data)  # must be JSON
                path = out[task]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "wb") as g:
                    g.write(data)
                os.replace(tmp, path)
                del wanted[member.name]
                if not wanted:
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TaskDataError(f"cannot read {sdist} ({e}); delete it and download again") from e
    finally:
        if bar is not None:
            bar.close()
    if wanted:
        raise TaskDataError(f"{sdist} has no {sorted(wanted)}")
    return out


def load_task_json(path: str) -> dict:
    """A BIG-bench task.json, checked: a dict with a non-empty "examples" list whose
    items have a string "input" and "target" or "target_scores"."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TaskDataError(f"cannot read BIG-bench task file {path}: {e}") from e
    ex = d.get("examples") if isinstance(d, dict) else None
    if not isinstance(ex, list) or not ex:
        raise TaskDataError(f"{path}: no \"examples\" list")
    for i, e in enumerate(ex):
        if not isinstance(e, dict) or not isinstance(e.get("input"), str):
            raise TaskDataError(f"{path}: example {i} has no string \"input\"")
        if "target" not in e and "target_scores" not in e:
            raise TaskDataError(f"{path}: example {i} has neither \"target\" nor \"target_scores\"")
    return d


# -- formatting --------------------------------------------------------------------------
def _first(x):
    return x[0] if isinstance(x, list) else x


def label_of(example: dict, spec: TaskSpec) -> str:
    """The gold label word of a classification example (the max of target_scores)."""
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        best = max(scores, key=lambda k: scores[k])
        label = best.strip().lower()
    else:
        label = normalize_label(str(_first(example["target"])), spec.labels) or ""
    if label not in spec.labels:
        raise TaskDataError(f"{spec.name}: label {label!r} is not one of {spec.labels}")
    return label


def make_prompt(spec: TaskSpec, text: str) -> str:
    """The prompt for one input. The response starts with a space (the separator)."""
    text = " ".join(text.split())
    if spec.name == "gem/e2e_nlg":
        return f"{spec.instruction}{text}\nDescribe the restaurant:"
    if spec.name == "multiemo/all_sentence_en":
        return f"{spec.instruction}\nOpinion: {text}\nSentiment:"
    if spec.name == "strategyqa":
        return f"{spec.instruction}\nQuestion: {text}\nAnswer:"
    raise KeyError(spec.name)


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_dev = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_dev - n_test
    if n_train < 1:
        raise TaskDataError(f"too few distinct examples ({n}) to split")
    return n_train, n_dev, n_test


def build_splits(spec: TaskSpec, task: dict, seed: int = 0,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 max_train: int | None = None, max_dev: int | None = None,
                 max_test: int | None = None) -> dict[str, list[dict]]:
    """Fixed train/dev/test record lists. Units (distinct inputs) are shuffled with `seed`
    and cut by `fractions`; then each split is capped (`max_*`, a prefix of the shuffled
    order, so a smaller cap gives a subset of a larger one)."""
    rng = random.Random(seed)
    if spec.kind == "generation":
        groups: dict[str, list[str]] = {}
        for e in task["examples"]:
            tgt = _first(e["target"])
            if not isinstance(tgt, str) or not tgt.strip():
                continue
            groups.setdefault(" ".join(e["input"].split()), []).append(" ".join(tgt.split()))
        inputs = sorted(groups)
        rng.shuffle(inputs)
        n_train, n_dev, _ = _split_counts(len(inputs), fractions)
        parts = {"train": inputs[:n_train], "dev": inputs[n_train:n_train + n_dev],
                 "test": inputs[n_train + n_dev:]}
        out = {}
        for split, keys in parts.items():
            if split == "test":  # one record per input, all references
                recs = [{"prompt": make_prompt(spec, k), "response": " " + groups[k][0], "input": k,
                         "references": groups[k]} for k in keys]
            else:  # one record per (input, reference)
                recs = [{"prompt": make_prompt(spec, k), "response": " " + t, "input": k}
                        for k in keys for t in groups[k]]
                rng.shuffle(recs)
            out[split] = recs
    else:
        seen: dict[str, str] = {}
        conflicting = set()
        for e in task["examples"]:
            k = " ".join(e["input"].split())
            lab = label_of(e, spec)
            if k in seen and seen[k] != lab:
                conflicting.add(k)
            seen.setdefault(k, lab)
        inputs = sorted(k for k in seen if k not in conflicting)
        rng.shuffle(inputs)
        n_train, n_dev, _ = _split_counts(len(inputs), fractions)
        parts = {"train": inputs[:n_train], "dev": inputs[n_train:n_train + n_dev],
                 "test": inputs[n_train + n_dev:]}
        out = {split: [{"prompt": make_prompt(spec, k), "response": " " + seen[k], "input": k, "label": seen[k]}
                       for k in keys] for split, keys in parts.items()}
    caps = {"train": max_train, "dev": max_dev, "test": max_test}
    for split, cap in caps.items():
        if cap is not None:
            out[split] = out[split][:cap]
    for split in ("train", "test"):
        if not out[split]:
            raise TaskDataError(f"{spec.name}: empty {split} split")
    return out


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_task(name: str, data_dir: str, seed: int = 0, max_train: int | None = None,
                 max_dev: int | None = None, max_test: int | None = None,
                 task_json: str | None = None, cache_dir: str | None = None, progress: bool = True,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict:
    """Write `data_dir/<task slug>/{train,dev,test}.jsonl` and `meta.json`; returns the meta
    (paths, counts, seed, sha256 of the task file). `task_json` gives the task file
    directly (tests, offline use); otherwise it is fetched and extracted from the sdist."""
    spec = get_task(name)
    if task_json is None:
        sdist = fetch_bigbench(cache_dir, progress)
        extracted = os.path.join(cache_dir or default_cache_dir(), "bigbench", "tasks")
        task_json = extract_tasks(sdist, [spec.name], extracted, progress)[spec.name]
    with open(task_json, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    task = load_task_json(task_json)
    splits = build_splits(spec, task, seed, fractions, max_train, max_dev, max_test)
    out_dir = os.path.join(data_dir, spec.slug)
    paths = {}
    for split, recs in splits.items():
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], recs)
    meta = {"task": spec.name, "kind": spec.kind, "labels": list(spec.labels), "seed": seed,
            "fractions": list(fractions), "source": os.path.abspath(task_json), "source_sha256": sha,
            "bigbench_version": BIGBENCH_VERSION, "counts": {s: len(r) for s, r in splits.items()},
            "distinct_inputs": {s: len({r["input"] for r in recs}) for s, recs in splits.items()},
            "paths": paths, "max_new_tokens": spec.max_new_tokens, "metrics": list(spec.metrics)}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


# -- scoring -----------------------------------------------------------------------------
def clean_generation(text: str) -> str:
    """The answer part of a generation: the first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generation names: its first word, lower-cased, stripped of punctuation
    (None when that word is not a label)."""
    words = re.findall(r"[A-Za-z]+", text.lower())
    if not words:
        return None
    return words[0] if words[0] in labels else None


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenisation), any number of references each."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError("one reference list per prediction")
    n = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(n)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """rouge-score ROUGE-L F1 x100 (stemming on), best reference per example, mean."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vals = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return 100.0 * sum(vals) / max(1, len(vals))


def accuracy(predictions: Sequence[str], labels: Sequence[str], choices: Sequence[str]) -> float:
    if len(predictions) != len(labels):
        raise ValueError("one label per prediction")
    ok = sum(normalize_label(p, choices) == l for p, l in zip(predictions, labels))
    return 100.0 * ok / max(1, len(labels))


def score(name: str, predictions: Sequence[str], records: Sequence[dict]) -> dict[str, float]:
    """Metrics of raw generations on test `records` (as written by prepare_task), x100."""
    spec = get_task(name)
    preds = [clean_generation(p) for p in predictions]
    if spec.kind == "generation":
        refs = [r.get("references") or [r["response"].strip()] for r in records]
        return {"bleu": bleu(preds, refs), "rougeL": rouge_l(preds, refs)}
    labels = [r.get("label") or r["response"].strip() for r in records]
    return {"accuracy": accuracy(preds, labels, spec.labels)}


# -- synthetic data in the BIG-bench format (tests, --tiny) -------------------------------
def synthetic_task_json(name: str, n: int = 24, seed: int = 0) -> dict:
    """A small fake task.json in the BIG-bench format of task `name`."""
    spec = get_task(name)
    rng = random.Random(seed)
    if spec.name == "gem/e2e_nlg":
        names, foods, areas = ["Alpha", "Beta", "Gamma", "Delta", "Omega", "Zeta"], ["Italian", "French",
                                                                                       "Chinese"], ["riverside",
                                                                                                    "centre"]
        ex = []
        for i in range(n):
            nm, fd, ar = names[i % len(names)], foods[(i // len(names)) % len(foods)], rng.choice(areas)
            inp = f"name: {nm}, food: {fd}, area: {ar}"
            for t in (f"{nm} serves {fd} food in the {ar}.", f"In the {ar}, {nm} is a {fd} place."):
                ex.append({"input": inp, "target": t, "comment": f"synthetic-{i}"})
        return {"name": "e2e_nlg", "metrics": ["bleu", "rouge"], "examples": ex,
                "example_input_prefix": "\nThere is a restaurant with the following attributes: ",
                "example_output_prefix": "\nDescribe the restaurant: "}
    words = {"positive": "I love it", "negative": "I hate it", "neutral": "It is a film",
             "ambivalent": "I love and hate it", "yes": "Is the sky blue", "no": "Is fire cold"}
    ex = []
    for i in range(n):
        lab = spec.labels[i % len(spec.labels)]
        ex.append({"input": f"{words[lab]} {i}?", "target_scores": {
            (l.capitalize() if spec.name == "strategyqa" else l): int(l == lab) for l in spec.labels}})
    return {"name": spec.name.split("/")[-1], "metrics": ["multiple_choice_grade"], "examples": ex}


def write_synthetic_task(name: str, directory: str, n: int = 24, seed: int = 0) -> str:
    path = os.path.join(directory, _safe_task_path(get_task(name).name), "task.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(synthetic_task_json(name, n, seed), f)
    return path
