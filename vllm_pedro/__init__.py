"""vllm-pedro: PEDRO adapters (arXiv 2409.17834) for transformers and vLLM.

The core (config, generator, adapter IO, transformers reference) never imports vLLM;
`vllm_pedro.LLM` and `vllm_pedro.PedroRequest` load the vLLM plugin on first use."""

from .config import AdapterError, BaseShapes, PedroConfig
from .hf.model import PedroModel, get_pedro_model

__version__ = "0.1.0"
__all__ = ["AdapterError", "BaseShapes", "PedroConfig", "PedroModel", "get_pedro_model",
           "LLM", "PedroRequest", "__version__"]


def __getattr__(name):
    if name in ("LLM", "PedroRequest"):
        from . import vllm as _plugin
        return getattr(_plugin, name)
    raise AttributeError(f"module 'vllm_pedro' has no attribute {name!r}")
