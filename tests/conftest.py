"""Shared fixtures: tiny random-weight Llama and Qwen2 models, built once per session.

Other test modules reuse `tiny_llama_dir` and `tiny_qwen2_dir` (paths to a saved model
directory with its tokenizer), built with build_tiny_model's default shapes (grouped-query
attention: fewer KV heads than query heads). Read shapes from the model's config, not from here."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton runs interpreted (TRITON_INTERPRET=1), decided here, before any test
# module imports triton (vLLM and transformers do): triton.jit picks the mode when it
# decorates, and an interpreted kernel cannot call triton.language's own jit functions
# (tl.sum, tl.max) decorated in the compiled mode. A GPU session tests compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_pedro.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2")), arch="qwen2", seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request) -> str:
    """Both tiny models in turn (parametrised over architecture)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread, and far faster on a shared, busy machine.
    Use per module: pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
