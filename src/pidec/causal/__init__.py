"""Decoder-only models (Llama, Qwen2, Qwen3, Mistral) in the pid layout: the document is a shared
prefix, prefilled once; every row's queries meet its single key/value copy in one product, each
row attends its own suffix, and the two attentions merge by their log-sum-exp.

model.py: the causal LM and its shared-prefix attention; checkpoint.py: Hugging Face folders in
and out; layouts.py: templates and the rows' common prefix; generate.py: prefill and decoding;
api.py: `CausalModel`, which `pidec.load` returns for these checkpoints.
"""

from .api import CausalModel, use_template
from .layouts import Template

__all__ = ["CausalModel", "Template", "use_template"]
