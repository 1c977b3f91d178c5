"""The vLLM plugin. Importing this package imports vLLM."""

from .offline import LLM
from .plugin import register
from .request import PedroRequest

__all__ = ["LLM", "PedroRequest", "register"]
