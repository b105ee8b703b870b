"""pidec: encode once, decode every subtask in parallel (prompt-in-decoder T5)."""

from .api import EncodedDocument, GenerationResult, Model, load
from .layouts import LAYOUTS, InputError
from .model import T5, T5Config

__version__ = "0.1.0"
__all__ = ["load", "Model", "EncodedDocument", "GenerationResult", "InputError", "LAYOUTS", "T5", "T5Config"]
