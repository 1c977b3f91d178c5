"""vllm-pedro: PEDRO adapters (arXiv 2409.17834) for transformers and vLLM."""

from .config import AdapterError, BaseShapes, PedroConfig
from .hf.model import PedroModel, get_pedro_model

__version__ = "0.1.0"
__all__ = ["AdapterError", "BaseShapes", "PedroConfig", "PedroModel", "get_pedro_model", "__version__"]
