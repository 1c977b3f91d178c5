"""PEDRO in TRL's SFTTrainer (needs `pip install trl`, the `trl` extra).

    trainer = PedroSFTTrainer(model=pm, args=SFTConfig(...), train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer)

Data: prompt/completion rows, plain ({"prompt": str, "completion": str}) or conversational
({"prompt": [messages], "completion": [{"role": "assistant", ...}]}). TRL tokenises them
(a conversational prompt with the chat template and the generation prompt, tokenised
without added special tokens: the prompt vLLM's /v1/chat/completions prefills, the same
as vllm_pedro.data.encode_chat) and masks the prompt out of the labels; the collator here,
PedroDataCollator, reads each row's prompt length off those labels, so the vectors come
from the prompt and the loss from the completion. Not supported: packing and
padding-free batches (several prompts in one row), and language-modeling rows
({"messages"} or {"text"}), whose loss is not one completion after one prompt; for
multi-turn chats write one prompt/completion row per assistant turn, or use
`vllm-pedro train` with {"messages"} records.

Everything else is PedroTrainerMixin (saving and loading the adapter, the config that
TRL reads is the base model's). The model card TRL writes next to each checkpoint is
skipped: it reads a transformers config, and the adapter folder describes itself.
"""

from __future__ import annotations

from trl import SFTTrainer

from ..data import PedroDataCollator
from .trainer import PedroTrainerMixin


class PedroSFTTrainer(PedroTrainerMixin, SFTTrainer):
    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if args is not None and (args.packing or args.padding_free):
            raise ValueError("PEDRO takes one prompt per row: SFTConfig(packing=True) and padding_free=True are "
                             "not supported")
        if args is not None and args.completion_only_loss is False:
            raise ValueError("PEDRO trains on the completion (its vectors come from the prompt): leave "
                             "SFTConfig.completion_only_loss at None or True")
        if data_collator is None:
            if processing_class is None:
                raise ValueError("give processing_class (the tokenizer), or a data_collator")
            data_collator = PedroDataCollator(processing_class)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        return None
