"""Training data: JSONL of {"prompt", "response"} or {"messages"} records, tokenisation,
batching.

An example is (prompt, response). PEDRO computes its vectors from the prompt tokens, the
first `prompt_length` tokens of each right-padded row; the loss is on the rest.

- {"prompt", "response"}: the prompt and the response are tokenised separately and
  concatenated (put any separator, a space or a newline, in the text itself), the
  response followed by the tokenizer's EOS. The prompt is tokenised as vLLM's
  /v1/completions tokenises a text prompt (the tokenizer's usual special tokens, e.g. BOS).
- {"messages": [{"role", "content"}, ...]}: a chat. Every assistant message (after the
  first message) is one example: its prompt is the conversation before it, rendered
  exactly as vLLM's /v1/chat/completions renders it for the server (`chat_prompt_ids`),
  its response is the rest of the conversation rendered up to and including that
  message (the message and whatever the template puts after it: end-of-turn tokens).
  So the loss is on assistant turns only, and the vectors a tenant learns from come
  from the prompt the server will prefill.
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
    source: str = ""  # "path:line", for error messages


@dataclass
class ChatRecord:
    messages: list[dict]
    line: int
    source: str = ""


@dataclass
class Example:
    input_ids: list[int]
    prompt_length: int


KINDS = {Record: "prompt/response", ChatRecord: "chat (\"messages\")"}


def read_jsonl(path: str) -> list[Record | ChatRecord]:
    """Read a JSONL file of {"prompt": str, "response": str} objects or of
    {"messages": [{"role": str, "content": str}, ...]} objects, one kind per file (other
    keys are ignored; blank lines are skipped). Raises DataError naming `path:line` on a
    bad record."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    records: list[Record | ChatRecord] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_record(line, f"{path}:{lineno}", lineno)
            if records and type(record) is not type(records[0]):
                raise DataError(f"{record.source}: a {KINDS[type(record)]} record in a file of "
                                f"{KINDS[type(records[0])]} records (line {records[0].line}); a file holds one kind")
            records.append(record)
    if not records:
        raise DataError(f"data file {path!r} holds no records")
    return records


def _parse_record(line: str, where: str, lineno: int) -> Record | ChatRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\" (or \"messages\"), "
                        f"got {type(obj).__name__}")
    if "messages" in obj:
        return ChatRecord(check_messages(obj["messages"], where), lineno, where)
    for key in ("prompt", "response"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r} (a record needs \"prompt\" and \"response\", "
                            f"or \"messages\")")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["prompt"]:
        raise DataError(f"{where}: empty prompt (PEDRO computes its vectors from the prompt)")
    return Record(obj["prompt"], obj["response"], lineno, where)


def check_messages(messages, where: str = "messages") -> list[dict]:
    """Refuse, naming `where` and the message, anything but a list of {"role": str,
    "content": str} objects with an assistant message after the first message (other
    keys are passed to the chat template as they are)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"a {type(m[key]).__name__}"
                raise DataError(f"{where}: messages[{i}][{key!r}] must be a string, got {got}")
        if not m["role"]:
            raise DataError(f"{where}: messages[{i}] has an empty role")
    if not any(m["role"] == "assistant" for m in messages[1:]):
        raise DataError(f"{where}: no assistant message after the first message: nothing to train on (each "
                        f"assistant turn is an example whose prompt is the conversation before it)")
    return messages


# -- tokenisation ------------------------------------------------------------------------
def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> Example:
    """Tokenise one example: prompt tokens (with the tokenizer's usual special tokens,
    e.g. BOS), then response tokens and EOS. If the whole is longer than `max_len`, the
    prompt is cut from the left (a leading BOS is kept) and the response is kept; only a
    response that alone does not fit is cut from the right. At least one prompt token
    always remains."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    response_ids.append(tokenizer.eos_token_id)
    return fit_example(prompt_ids, response_ids, max_len, tokenizer.bos_token_id)


def fit_example(prompt_ids: list[int], response_ids: list[int], max_len: int, bos: int | None) -> Example:
    """An Example of at most `max_len` tokens, cut as encode_example says."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    keep_bos = bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos
    min_prompt = 2 if keep_bos else 1
    if len(response_ids) > max_len - min_prompt:
        response_ids = response_ids[:max_len - min_prompt]
    room = max_len - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = ([bos] + prompt_ids[len(prompt_ids) - room + 1:]) if keep_bos else prompt_ids[-room:]
    return Example(prompt_ids + response_ids, len(prompt_ids))


def check_chat_template(tokenizer, where: str = "") -> None:
    if not getattr(tokenizer, "chat_template", None):
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}chat records (\"messages\") need a tokenizer with a chat template, and "
                        f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'}) "
                        f"has none: set tokenizer.chat_template (as vLLM's --chat-template would serve it) or use "
                        f"{{\"prompt\", \"response\"}} records")


def chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    """`messages` rendered with the tokenizer's chat template and tokenised as vLLM 0.32
    does for /v1/chat/completions: apply_chat_template to text, then the tokenizer
    with add_special_tokens=False (the request's default; the template writes any BOS)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The prompt tokens vLLM's /v1/chat/completions prefills for `messages` (with the
    generation prompt): what a tenant's vectors are computed from when it is served."""
    check_chat_template(tokenizer)
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def encode_chat(tokenizer, messages: Sequence[dict], max_len: int, where: str = "messages") -> list[Example]:
    """One Example per assistant message after the first message: the prompt is the
    conversation before it as the server renders it (chat_prompt_ids), the response is
    what the template renders from there up to and including the message. Raises
    DataError if the template does not render that prompt as a prefix of the longer
    conversation (the loss would then train on a context the server never shows)."""
    check_chat_template(tokenizer, where)
    examples = []
    for i, m in enumerate(messages):
        if i == 0 or m["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = chat_ids(tokenizer, messages[:i + 1], add_generation_prompt=False)
        turn = f"{where}: assistant message {i}"
        if full[:len(prompt)] != prompt:
            j = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise DataError(
                f"{turn}: the chat template does not render the conversation before this message (with the "
                f"generation prompt) as a prefix of the conversation up to it: the tokens differ from position {j} "
                f"({tokenizer.decode(prompt[j:j + 8])!r} vs {tokenizer.decode(full[j:j + 8])!r}). PEDRO's vectors "
                f"come from the prompt vLLM renders; this template cannot be trained on chat records as it is")
        if len(full) == len(prompt):
            raise DataError(f"{turn}: renders to no tokens after the prompt: nothing to train on")
        if not prompt:
            raise DataError(f"{turn}: the conversation before it renders to no tokens (PEDRO needs a prompt)")
        examples.append(fit_example(prompt, full[len(prompt):], max_len, tokenizer.bos_token_id))
    return examples


def encode_records(tokenizer, records: Sequence[Record | ChatRecord], max_len: int,
                   progress: bool = False) -> list[Example]:
    """Examples of `records` (a chat record gives one per assistant turn), in order."""
    from tqdm.auto import tqdm

    examples: list[Example] = []
    for r in tqdm(records, desc="encode", disable=not progress, dynamic_ncols=True):
        try:
            if isinstance(r, ChatRecord):
                examples.extend(encode_chat(tokenizer, r.messages, max_len, r.source or "messages"))
            else:
                examples.append(encode_example(tokenizer, r.prompt, r.response, max_len))
        except DataError:
            raise
        except ValueError as e:  # name the record
            raise DataError(f"{r.source or 'record'}: {e}") from None
    return examples


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


# -- transformers Trainer and TRL -------------------------------------------------------
def to_rows(examples: Sequence[Example]) -> list[dict]:
    """Examples as dataset rows for transformers' Trainer: {"input_ids", "prompt_lengths"}.
    The key is named after PedroModel.forward's argument, so Trainer's removal of columns
    the model does not take keeps it."""
    return [{"input_ids": list(e.input_ids), "prompt_lengths": e.prompt_length} for e in examples]


def row_to_example(row) -> Example:
    """An Example from a Trainer row: an Example, {"input_ids", "prompt_lengths"}, or
    {"input_ids", "labels"} as TRL's SFTTrainer prepares prompt/completion data (IGNORE_INDEX
    on the prompt, then the completion's ids): the prompt is the tokens before the first label."""
    if isinstance(row, Example):
        return row
    ids = [int(t) for t in row["input_ids"]]
    if row.get("prompt_lengths") is not None:
        return Example(ids, int(row["prompt_lengths"]))
    if row.get("labels") is None:
        raise ValueError("a PEDRO training row needs \"prompt_lengths\" or \"labels\" besides \"input_ids\"")
    labels = [int(t) for t in row["labels"]]
    n = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    if n == 0 or n == len(labels) or labels[n:] != ids[n:]:
        raise ValueError(
            "PEDRO takes its vectors from the prompt: a row's labels must be IGNORE_INDEX on a non-empty prompt, "
            "then the input ids to the end (one prompt and one completion per row; with TRL use prompt/completion "
            f"data and completion_only_loss). Got {n} ignored then {len(labels) - n} labels that are not all the "
            f"input ids")
    return Example(ids, n)


class PedroDataCollator:
    """data_collator for transformers' Trainer (and TRL's SFTTrainer): rows (see
    row_to_example) -> collate(): input_ids, attention_mask, labels (IGNORE_INDEX on the
    prompt and padding) and prompt_lengths, right-padded."""

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        if pad_id is None:
            if tokenizer is None:
                raise ValueError("give a tokenizer or a pad_id")
            pad_id = pad_token_id(tokenizer)
        self.pad_id = pad_id

    def __call__(self, rows: Sequence) -> dict[str, torch.Tensor]:
        return collate([row_to_example(r) for r in rows], self.pad_id)
