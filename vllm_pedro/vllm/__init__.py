"""The vLLM plugin. Importing this package imports vLLM."""

from .offline import LLM, PedroRequest
from .plugin import register

__all__ = ["LLM", "PedroRequest", "register"]
