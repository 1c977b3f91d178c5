"""Training data: JSONL of {"prompt", "response"} records, tokenisation, batching.

An example is (prompt, response). The prompt and the response are tokenised separately
and concatenated (put any separator, a space or a newline, in the text itself), the
response followed by the tokenizer's EOS. The loss is on the response tokens (and EOS)
only; PEDRO computes its vectors from the prompt tokens, the first `prompt_length`
tokens of each right-padded row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training or dev file that cannot be read; the message names the file and line."""


@dataclass
class Record:
    prompt: str
    response: str
    line: int  # 1-based line number in the source file (0 when built in memory)


@dataclass
class Example:
    input_ids: list[int]
    prompt_length: int


def read_jsonl(path: str) -> list[Record]:
    """Read a JSONL file of {"prompt": str, "response": str} objects (other keys are
    ignored; blank lines are skipped). Raises DataError naming `path:line` on a bad record."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\", "
                                f"got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if key not in obj:
                    raise DataError(f"{where}: missing key {key!r} (a record needs \"prompt\" and \"response\")")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj["prompt"]:
                raise DataError(f"{where}: empty prompt (PEDRO computes its vectors from the prompt)")
            records.append(Record(obj["prompt"], obj["response"], lineno))
    if not records:
        raise DataError(f"data file {path!r} holds no records")
    return records


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> Example:
    """Tokenise one example: prompt tokens (with the tokenizer's usual special tokens,
    e.g. BOS), then response tokens and EOS. If the whole is longer than `max_len`, the
    prompt is cut from the left (a leading BOS is kept) and the response is kept; only a
    response that alone does not fit is cut from the right. At least one prompt token
    always remains."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    response_ids.append(tokenizer.eos_token_id)

    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos
    min_prompt = 2 if keep_bos else 1
    if len(response_ids) > max_len - min_prompt:
        response_ids = response_ids[:max_len - min_prompt]
    room = max_len - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = ([bos] + prompt_ids[len(prompt_ids) - room + 1:]) if keep_bos else prompt_ids[-room:]
    return Example(prompt_ids + response_ids, len(prompt_ids))


def encode_records(tokenizer, records: Sequence[Record], max_len: int) -> list[Example]:
    return [encode_example(tokenizer, r.prompt, r.response, max_len) for r in records]


def pad_token_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id")
    return pid


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids, attention_mask, prompt_lengths ([B]) and
    labels (the input ids on response tokens, IGNORE_INDEX on prompt and padding; the
    model shifts them)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    prompt_lengths = torch.empty(b, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, e.prompt_length:n] = ids[e.prompt_length:]
        prompt_lengths[i] = e.prompt_length
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "prompt_lengths": prompt_lengths, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int,
            order: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `batch_size` examples, in `order` (default: as given); the
    last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = list(range(len(examples))) if order is None else list(order)
    for s in range(0, len(idx), batch_size):
        yield collate([examples[i] for i in idx[s:s + batch_size]], pad_id)
