"""PEDRO inside transformers' Trainer (and, through vllm_pedro.hf.sft, TRL's SFTTrainer).

    pm = get_pedro_model(base, PedroConfig(r=16))
    trainer = PedroTrainer(model=pm, args=TrainingArguments(...), train_dataset=to_rows(examples),
                           data_collator=PedroDataCollator(tokenizer))
    trainer.train()
    trainer.save_model("adapters/tenant-a")      # adapter_config.json + adapter_model.safetensors

What a plain `Trainer(model=pm)` would get wrong, and what PedroTrainer does instead:

- Saving. Trainer saves a model that is not a transformers PreTrainedModel as its whole
  state dict in model.safetensors: the frozen base model as well (and safetensors refuses
  tied embeddings). PedroTrainer's `_save` (save_model and every checkpoint) writes the
  adapter with PedroModel.save_pretrained, plus training_args.json (not Trainer's pickled
  training_args.bin: an adapter folder holds no pickle). The tokenizer is not saved: an
  adapter serves with its base model's tokenizer and chat template.
- Loading. resume_from_checkpoint and load_best_model_at_end read the adapter back into
  the model (Trainer's loaders look for a full model or a peft adapter).
- `model.config`. Trainer and TRL read `model.config` as a transformers config (special
  tokens, use_cache, model cards); PedroModel.config is the adapter's PedroConfig. So the
  Trainer is built on the base model, whose config is the real one, and then trains
  `PedroTrainingView(pm)`: PedroModel's parameters and forward, without a `config`.
  `trainer.model.pedro` (or your own `pm`) is the PedroModel.

Gradient checkpointing (TrainingArguments(gradient_checkpointing=True)) calls
PedroModel.gradient_checkpointing_enable: non-reentrant, with the prompt mask restored
for the recomputation (hf/checkpointing.py). bf16=True is accelerate's autocast; the
generators' parameters and AdamW's state stay float32.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer

from ..adapter_io import load_adapter
from .model import PedroModel, base_shapes_of

TRAINING_ARGS_JSON = "training_args.json"


class PedroTrainingView(nn.Module):
    """What the Trainer trains: the PedroModel (its parameters, forward, gradient
    checkpointing) without PedroModel.config, which Trainer would read as a transformers
    config."""

    def __init__(self, pedro: PedroModel):
        super().__init__()
        self.pedro = pedro

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        return self.pedro(input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths, labels=labels,
                          **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.pedro.gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pedro.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.pedro.is_gradient_checkpointing

    def save_pretrained(self, directory: str, **_) -> None:
        self.pedro.save_pretrained(directory)


class PedroTrainerMixin:
    """Put before a transformers Trainer subclass (Trainer, TRL's SFTTrainer, ...): it
    takes a PedroModel, builds the trainer on its base model, then trains the adapter
    and saves and loads it as an adapter (see the module docstring)."""

    def __init__(self, model: PedroModel, *args, **kwargs):
        if not isinstance(model, PedroModel):
            raise TypeError(f"{type(self).__name__} trains a PedroModel (get_pedro_model), got {type(model).__name__}")
        super().__init__(model.base_model, *args, **kwargs)
        self.pedro = model
        self.model = self.model_wrapped = PedroTrainingView(model)
        self.callback_handler.model = self.model
        if self.place_model_on_device:  # the trainer moved the base model; the generators follow
            self._move_model_to_device(self.model, self.args.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.pedro.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as f:
            f.write(self.args.to_json_string())

    def _load_adapter_from(self, directory: str) -> None:
        config, tensors = load_adapter(directory, base=base_shapes_of(self.pedro.base_model))
        mine, theirs = self.pedro.config.to_dict(), config.to_dict()
        differ = sorted(k for k in mine if k != "base_model_name_or_path" and mine[k] != theirs.get(k))
        if differ:
            raise ValueError(f"the adapter in {directory!r} differs from the one being trained in {differ}")
        self.pedro.load_adapter_tensors(tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_adapter_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_from(self.state.best_model_checkpoint)


class PedroTrainer(PedroTrainerMixin, Trainer):
    """transformers' Trainer for a PedroModel. Data: rows of vllm_pedro.data.to_rows and
    PedroDataCollator (input_ids, attention_mask, labels, prompt_lengths)."""

