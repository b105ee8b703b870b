"""pidec: encode once, decode every subtask in parallel (prompt-in-decoder T5).

The public surface: `load` a checkpoint into a `Model`, then `Model.generate`,
`generate_batch`, `encode` and `save_pretrained`; results come as `GenerationResult` (with
`return_details=True`) and encoded documents as `EncodedDocument`. Every error a caller can fix
derives from `InputError`.
"""

from .api import EncodedDocument, GenerationResult, Model, load
from .causal import CausalModel  # also registers decoder-only checkpoints with `load`
from .checkpoint import CheckpointError
from .data import DataError
from .errors import InputError
from .layouts import LAYOUTS
from .model import T5, T5Config
from .quantize import QuantizeError

__version__ = "0.1.0"
__all__ = [
    "load",
    "Model",
    "CausalModel",
    "EncodedDocument",
    "GenerationResult",
    "InputError",
    "CheckpointError",
    "DataError",
    "QuantizeError",
    "LAYOUTS",
    "T5",
    "T5Config",
]
