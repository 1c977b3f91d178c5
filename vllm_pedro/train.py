"""The training loop behind `vllm-pedro train`: PEDRO, or the peft LoRA / IA3 baselines
with the same data, loop, optimiser and schedule, so comparisons differ only in the method.

AdamW with linear warm-up and linear decay, gradient accumulation (the loss is the mean
over all response tokens of the accumulated batch, so accumulating k micro-batches gives
the gradient of one k-times bigger batch), periodic evaluation on a dev file, early
stopping on dev loss with the best adapter kept, and `save_pretrained` at the end.

Memory: gradient checkpointing of the frozen base model's decoder layers (PEDRO's
generators are recomputed with their prompt mask in backward: hf/checkpointing.py) and
bf16 autocast (the forward's matrix products in bfloat16 on the CPU or CUDA; the
trainable parameters, their gradients and AdamW's state stay float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PedroConfig
from .data import IGNORE_INDEX, batches, encode_records, pad_token_id, read_jsonl
from .hf.model import PedroModel, get_pedro_model

METHODS = ("pedro", "lora", "ia3")
METRICS_NAME = "train_metrics.json"
# peft's defaults for Llama-family models (also Qwen2: same module names).
LORA_TARGETS = ("q_proj", "v_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


@dataclass
class TrainArgs:
    model: str  # base model directory (local)
    train_file: str  # JSONL of {"prompt", "response"} or of {"messages"} (chat) records
    output_dir: str  # where the adapter and train_metrics.json go
    dev_file: str | None = None
    method: str = "pedro"  # pedro | lora | ia3
    # PEDRO
    r: int = 16
    pooler: str = "attention"
    activation: str = "rational"
    targets: tuple[str, ...] = ("q", "v", "up")
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # bi-level optimisation (PEDRO with the rational activation): the activation's
    # coefficients step on a held-out slice of the training data, alternating with the
    # generator weights, which step on the rest (first-order, as DARTS' first-order variant)
    bilevel: bool = False
    bilevel_holdout: float = 0.1  # fraction of the training examples held out for the coefficients
    bilevel_lr: float | None = None  # the coefficients' peak learning rate (default: lr)
    bilevel_every: int = 1  # one coefficient step every this many weight steps
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0  # None or <= 0: no clipping
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    max_len: int = 512
    # memory
    gradient_checkpointing: bool = False  # recompute the base model's decoder layers in backward
    bf16: bool = False  # bf16 autocast of the forward; trainable parameters and optimizer state stay float32
    # evaluation and early stopping
    eval_steps: int | None = None  # None or 0: evaluate at the end of every epoch
    eval_batch_size: int | None = None  # default: batch_size
    patience: int | None = None  # evaluations without improvement before stopping
    min_delta: float = 0.0
    # run
    seed: int = 0
    dtype: str = "float32"  # base model dtype
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in train_metrics.json, unused

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        for name in ("batch_size", "grad_accum", "epochs", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if self.patience is not None and not self.dev_file:
            raise ValueError("early stopping (patience) needs a dev file")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.bilevel:
            if self.method != "pedro" or self.activation != "rational":
                raise ValueError("bi-level optimisation trains the rational activation's coefficients: it needs "
                                 "--method pedro --activation rational")
            if not 0.0 < self.bilevel_holdout < 1.0:
                raise ValueError(f"bilevel_holdout must be in (0, 1), got {self.bilevel_holdout}")
            if self.bilevel_every < 1:
                raise ValueError(f"bilevel_every must be at least 1, got {self.bilevel_every}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose float32, float16 or bfloat16")
        if self.bf16 and self.dtype == "float16":
            raise ValueError("bf16 autocast needs a float32 or bfloat16 base model, not float16")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_model(path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) from a local model directory; nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"base model directory {path!r} does not exist (give a local directory "
                                f"with config.json, weights and tokenizer)")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return model.to(device), tokenizer


def wrap_model(model: nn.Module, args: TrainArgs) -> nn.Module:
    """Freeze the base model and attach a fresh adapter of `args.method`."""
    if args.method == "pedro":
        return get_pedro_model(model, PedroConfig(r=args.r, pooler=args.pooler, activation=args.activation,
                                                  targets=tuple(args.targets)))
    from peft import IA3Config, LoraConfig, get_peft_model

    if args.method == "lora":
        cfg = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                         lora_dropout=args.lora_dropout, target_modules=list(LORA_TARGETS))
    elif args.method == "ia3":
        cfg = IA3Config(task_type="CAUSAL_LM", target_modules=list(IA3_TARGETS),
                        feedforward_modules=list(IA3_FEEDFORWARD))
    else:
        raise ValueError(f"unknown method {args.method!r}; choose one of {METHODS}")
    return get_peft_model(model, cfg)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint the base model's decoder layers (non-reentrant: the frozen base's inputs
    need no gradient). PedroModel restores each pass's prompt mask for the recomputation."""
    if isinstance(model, PedroModel):
        model.gradient_checkpointing_enable()
    else:  # peft: its base model's layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 (or any) autocast on the model's device type; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _forward_logits(model: nn.Module, batch: dict[str, torch.Tensor],
                    logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    # use_cache=False: a training pass needs no KV cache (and checkpointing refuses one)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if isinstance(model, PedroModel):  # peft models do not take prompt_lengths
        kwargs["prompt_lengths"] = batch["prompt_lengths"]
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(**kwargs).logits


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the next-token cross entropy over the batch's response tokens, their count).
    `amp_dtype`: autocast the forward to it (bf16 mixed precision); the loss is float32.

    Only the positions that predict a response token (in any row) go through the LM
    head (transformers' `logits_to_keep`): with a 49k vocabulary and one-token answers
    the head over every prompt position would be a third of the step for nothing."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    with autocast(model, amp_dtype):
        logits = _forward_logits(model, batch, logits_to_keep=keep)
    labels = labels[:, keep]
    mask = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
    return loss, int(mask.sum())


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
                         amp_dtype: torch.dtype | None = None) -> float:
    """Backward over `micro_batches` as one batch: each micro-batch's summed loss is
    divided by the response tokens of all of them, so the accumulated gradient is exactly
    that of the mean loss over the whole group. Returns that mean loss."""
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    if n_tokens == 0:
        return float("nan")
    total = 0.0
    for b in micro_batches:
        loss, _ = token_loss_sum(model, b, amp_dtype)
        (loss / n_tokens).backward()  # outside autocast, as torch advises
        total += float(loss.detach())
    return total / n_tokens


@torch.no_grad()
def evaluate_loss(model: nn.Module, eval_batches: Iterable[dict[str, torch.Tensor]],
                  amp_dtype: torch.dtype | None = None) -> float:
    """Mean cross entropy over all response tokens of `eval_batches` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in eval_batches:
            loss, n = token_loss_sum(model, b, amp_dtype)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dev set has no response tokens")
    return total / count


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


UPPER_LEVEL = ("rat_num", "rat_den")  # the rational activation's coefficients


def is_upper_level(name: str) -> bool:
    """Whether parameter `name` belongs to the bi-level upper level (the architecture)."""
    return name.rsplit(".", 1)[-1] in UPPER_LEVEL


def split_holdout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(rest, held out): a seeded random `fraction` of `examples` (at least one each)."""
    if len(examples) < 2:
        raise ValueError("bi-level optimisation needs at least 2 training examples (one held out)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    k = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class BilevelUpper:
    """The upper level of bi-level optimisation (Liu et al., DARTS, first-order): the
    rational activations' coefficients are the architecture, fitted on held-out training
    examples; the generator weights are fitted on the rest. After each weight step (at
    the current weights, with no second-order term) one coefficient step follows on the
    next held-out batch, with its own AdamW and the same warm-up and decay."""

    def __init__(self, examples: list, params: list[torch.Tensor], args: TrainArgs, pad_id: int):
        if not params:
            raise RuntimeError("bi-level optimisation found no rational activation coefficients to train")
        self.examples, self.params, self.args, self.pad_id = examples, params, args, pad_id
        self.gen = torch.Generator().manual_seed(args.seed + 104729)
        self.queue: list[dict[str, torch.Tensor]] = []
        self.steps = 0

    def start(self, warmup: int, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        lr = self.args.bilevel_lr or self.args.lr
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        upper_total = max(1, total_steps // self.args.bilevel_every)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, min(warmup // self.args.bilevel_every, upper_total - 1), upper_total)

    def _next_batch(self) -> list[dict[str, torch.Tensor]]:
        if not self.queue:
            order = torch.randperm(len(self.examples), generator=self.gen).tolist()
            self.queue = list(batches(self.examples, self.args.batch_size, self.pad_id, order))
        return [self.queue.pop(0)]

    def step(self, model: nn.Module) -> float:
        loss = accumulate_gradients(model, self._next_batch(), autocast_dtype(self.args))
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        model.zero_grad(set_to_none=True)  # the weights' gradients from the held-out batch are dropped
        self.steps += 1
        return loss


def autocast_dtype(args: TrainArgs) -> torch.dtype | None:
    return torch.bfloat16 if args.bf16 else None


def save_adapter(model: nn.Module, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(model, PedroModel):
        model.save_pretrained(output_dir)
    else:  # peft: adapter_config.json + adapter_model.safetensors
        model.save_pretrained(output_dir, safe_serialization=True)


def train(args: TrainArgs, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Train an adapter as `args` says and save it (the best one on the dev set when a dev
    file is given) to `args.output_dir` with `train_metrics.json`. `model`/`tokenizer` may be
    passed to skip loading `args.model` (the model is then wrapped in place). Returns the
    metrics: best_dev_loss, initial_dev_loss, steps, trainable_params, wall_time_s,
    output_dir, ..."""
    args.validate()
    start = time.perf_counter()
    set_seed(args.seed)
    device = resolve_device(args.device)
    train_records = read_jsonl(args.train_file)
    dev_records = read_jsonl(args.dev_file) if args.dev_file else None
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model(args.model, args.dtype, device)
    else:
        model = model.to(device)
    pad_id = pad_token_id(tokenizer)
    train_examples = encode_records(tokenizer, train_records, args.max_len, args.progress)
    dev_examples = encode_records(tokenizer, dev_records, args.max_len, args.progress) if dev_records else None

    set_seed(args.seed)  # adapter init does not depend on how loading used the RNG
    model = wrap_model(model, args)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    amp = autocast_dtype(args)
    trainable, total_params = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters")
    upper = None  # bi-level: the held-out examples and parameters of the upper level
    if args.bilevel:
        train_examples, upper_examples = split_holdout(train_examples, args.bilevel_holdout, args.seed)
        upper_params = [p for n, p in model.named_parameters() if p.requires_grad and is_upper_level(n)]
        params = [p for n, p in model.named_parameters() if p.requires_grad and not is_upper_level(n)]
        upper = BilevelUpper(upper_examples, upper_params, args, pad_id)

    micro_per_epoch = math.ceil(len(train_examples) / args.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if upper is not None:
        upper.start(warmup, total_steps)

    eval_bs = args.eval_batch_size or args.batch_size

    def dev_loss() -> float:
        return evaluate_loss(model, batches(dev_examples, eval_bs, pad_id), amp)

    history: list[dict] = []
    evals: list[dict] = []
    best_loss, best_step, best_state, bad_evals = math.inf, None, None, 0
    initial_dev_loss = None
    stopped_early = False

    def do_eval(step: int) -> bool:
        """Evaluate, keep the best state; True when early stopping should stop."""
        nonlocal best_loss, best_step, best_state, bad_evals
        loss = dev_loss()
        evals.append({"step": step, "dev_loss": loss})
        if loss < best_loss - args.min_delta:
            best_loss, best_step, best_state, bad_evals = loss, step, _trainable_state(model), 0
        else:
            bad_evals += 1
        return args.patience is not None and bad_evals >= args.patience

    if dev_examples:
        initial_dev_loss = dev_loss()
        evals.append({"step": 0, "dev_loss": initial_dev_loss})
        best_loss, best_step, best_state = initial_dev_loss, 0, _trainable_state(model)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=f"train {args.method}", disable=not args.progress, dynamic_ncols=True)
    gen = torch.Generator().manual_seed(args.seed)
    step, epoch, last_eval_step = 0, 0, 0
    try:
        while step < total_steps and not stopped_early:
            order = torch.randperm(len(train_examples), generator=gen).tolist()
            micro = list(batches(train_examples, args.batch_size, pad_id, order))
            for g in range(0, len(micro), args.grad_accum):
                loss = accumulate_gradients(model, micro[g:g + args.grad_accum], amp)
                grad_norm = None
                if args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
                optimizer.step()
                scheduler.step()
                model.zero_grad(set_to_none=True)  # bi-level: the coefficients' gradients from this batch too
                step += 1
                rec = {"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                if upper is not None and step % args.bilevel_every == 0:
                    rec["upper_loss"] = upper.step(model)
                history.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", **({"dev": f"{best_loss:.4f}"} if evals else {}))
                if dev_examples and args.eval_steps and step % args.eval_steps == 0:
                    last_eval_step = step
                    if do_eval(step):
                        stopped_early = True
                        break
                if step >= total_steps:
                    break
            epoch += 1
            if dev_examples and not args.eval_steps and not stopped_early and last_eval_step != step:
                last_eval_step = step
                stopped_early = do_eval(step)
        if dev_examples and last_eval_step != step and not stopped_early:
            do_eval(step)
    finally:
        bar.close()

    if best_state is not None:
        _load_trainable_state(model, best_state)
    save_adapter(model, args.output_dir)
    metrics = {
        "method": args.method,
        "output_dir": os.path.abspath(args.output_dir),
        "steps": step,
        "epochs_started": epoch,
        "stopped_early": stopped_early,
        "best_dev_loss": best_loss if dev_examples else None,
        "best_step": best_step,
        "initial_dev_loss": initial_dev_loss,
        "final_train_loss": history[-1]["loss"] if history else None,
        "trainable_params": trainable,
        "total_params": total_params,
        "train_examples": len(train_examples),
        "dev_examples": len(dev_examples) if dev_examples else 0,
        "bilevel": None if upper is None else {"holdout_examples": len(upper.examples), "upper_steps": upper.steps,
                                               "order": "first-order, alternating"},
        "wall_time_s": time.perf_counter() - start,
        "device": str(device),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()},
        "evals": evals,
        "history": history,
    }
    with open(os.path.join(args.output_dir, METRICS_NAME), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return metrics
