"""Gradient checkpointing of the frozen base model with PEDRO attached.

PEDRO's generator runs in a forward pre-hook of each attention block, and only while
`PedroState.prompt_mask` is set (the pass that sees the prompt); the vectors are kept in
the shared state. Checkpointing a decoder layer drops its activations in the forward and
reruns the layer in backward, after PedroModel.forward has cleared the mask: the rerun
would then skip the generator and scale with whatever vectors the state holds, so the
recomputed tensors would not be the forward's (a torch error, or silently wrong
gradients). So the checkpoint of every layer is given a `context_fn` whose recompute
context sets the mask back to the one its forward saw: the rerun recomputes the same
vectors from the same hidden states, exactly.

Only non-reentrant checkpointing takes a `context_fn`; reentrant checkpointing also gives
no gradient to parameters used inside a layer whose inputs do not need one (a frozen
base), so it is refused.
"""

from __future__ import annotations

import contextlib
import functools

from .layer import PedroState


def checkpoint_kwargs(state: PedroState, user_kwargs: dict | None = None) -> dict:
    """torch.utils.checkpoint keyword arguments for transformers'
    gradient_checkpointing_enable: `user_kwargs` plus use_reentrant=False and PEDRO's
    context_fn."""
    kwargs = dict(user_kwargs or {})
    if kwargs.get("use_reentrant"):
        raise ValueError("PEDRO needs non-reentrant gradient checkpointing (use_reentrant=False): the recomputed "
                         "layer must see the pass's prompt mask again (a context_fn), and reentrant checkpointing "
                         "gives no gradient to the generators of a frozen base")
    if "context_fn" in kwargs:
        raise ValueError("PEDRO sets the checkpoint's context_fn itself (to restore the prompt mask)")
    kwargs["use_reentrant"] = False
    kwargs["context_fn"] = functools.partial(_contexts, state)
    return kwargs


def _contexts(state: PedroState):
    """Called by torch.utils.checkpoint in the layer's forward: (forward context,
    recompute context). The mask is captured now, while this pass's mask is set."""
    return contextlib.nullcontext(), _prompt_mask_set(state, state.prompt_mask)


@contextlib.contextmanager
def _prompt_mask_set(state: PedroState, mask):
    saved = state.prompt_mask
    state.prompt_mask = mask
    try:
        yield
    finally:
        state.prompt_mask = saved
