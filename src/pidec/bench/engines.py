"""The decoders of one benchmark run and how each configuration drives them: pidec (float, and
an int8 copy), transformers and CTranslate2 (`peers`). pidec's models are set up by
`pidec.inference.prepare_for_inference`, the same call `pidec.load` makes, so a row times the
model a user gets. Each runner decodes one document and returns (generated tokens per row, the
cross-attention cache bytes pidec measured, or None).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .. import checkpoint, packing
from .. import quantize as quant
from ..generate import Row, decode, encode
from ..inference import prepare_for_inference
from ..model import T5
from . import peers
from .configs import base_config, is_int8
from .workloads import DocDraw


def run_pidec_seq(ours: T5, hf, d: DocDraw, device):
    """One encoder row, one decoder row writing every subtask's "prompt: answer; " in turn."""
    cross = encode(ours, [d.document])
    res = decode(ours, cross, [Row(0, [ours.config.decoder_start_token_id], d.seq_len)], eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


def run_pidec_pie(ours: T5, hf, d: DocDraw, device):
    """K encoder rows (prompt + document), decoder rows [start], each its own length."""
    cross = encode(ours, [p + d.document for p in d.prompts])
    start = ours.config.decoder_start_token_id
    rows = [Row(i, [start], n) for i, n in enumerate(d.out_lens)]
    res = decode(ours, cross, rows, eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


def run_pidec_pid(ours: T5, hf, d: DocDraw, device):
    """The document encoded once; K rows [start] + prompt share its cross-attention cache, and
    each leaves the batch at its own length."""
    cross = encode(ours, [d.document])
    start = ours.config.decoder_start_token_id
    rows = [Row(0, [start] + p, n) for p, n in zip(d.prompts, d.out_lens)]
    res = decode(ours, cross, rows, eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


RUNNERS = {
    "hf-pie": peers.run_hf_pie,
    "hf-pid-expanded": peers.run_hf_pid_expanded,
    "pidec-seq": run_pidec_seq,
    "pidec-pie": run_pidec_pie,
    "pidec-pid": run_pidec_pid,
    "ct2-pie": peers.run_ct2_pie,
    "ct2-prefix": peers.run_ct2_prefix,
}


@dataclass
class Engines:
    """The models of one run: pidec's (`ours`, `ours_int8`), transformers' and CTranslate2's
    translators by precision ("float", "int8"). `packed`: pidec's float32 linear layers are packed."""

    ours: T5
    hf: object = None
    ours_int8: T5 | None = None
    ct2: dict = field(default_factory=dict)
    packed: bool = False

    def run(self, name: str, d: DocDraw, device):
        """Decode document `d` with configuration `name`."""
        base = base_config(name)
        if base.startswith("ct2-"):
            return RUNNERS[base](self.ours, self.ct2["int8" if is_int8(name) else "float"], d, device)
        return RUNNERS[base](self.ours_int8 if is_int8(name) else self.ours, self.hf, d, device)


def page_in(model) -> None:
    """Weights read from safetensors may be mapped lazily: touch them all now, or the first
    configuration to run is charged the whole model in its peak memory."""
    with torch.inference_mode():
        for p in model.parameters():
            p.detach().sum()


def load_models(folder, device: torch.device, dtype: torch.dtype, need_hf: bool):
    """pidec's model (in eval mode, not yet prepared) and, with `need_hf`, transformers' from
    the same checkpoint folder, both paged in."""
    ours = checkpoint.load_model(folder, device=device, dtype=dtype).eval()
    hf = peers.load_hf(folder, device, dtype, ours) if need_hf else None
    for m in (ours, hf):
        if m is not None:
            page_in(m)
    return ours, hf


def build_engines(
    folder, tmp, configs: list[str], *, device: torch.device, dtype: str, compile: bool = False, pack: bool = True
):
    """Load and prepare every model `configs` need from checkpoint `folder` (`tmp`: room for the
    CTranslate2 conversion). Returns (Engines, skipped: [(names, reason)]) where a
    configuration cannot run here (ctranslate2 missing, int8 refused)."""
    skipped = []
    why = peers.ct2_missing()
    if why is not None and any(c.startswith("ct2-") for c in configs):
        skipped.append(([c for c in configs if c.startswith("ct2-")], why))
    ours, hf = load_models(folder, device, getattr(torch, dtype), any(c.startswith("hf-") for c in configs))
    engines = Engines(ours, hf)
    pack_weights = None if pack else False  # pack where it applies, as pidec.load does by default
    int8_pidec = [c for c in configs if is_int8(c) and c.startswith("pidec-")]
    if int8_pidec:
        try:  # an int8 copy of the float model, its float LM head packed as pidec.load packs it
            engines.ours_int8 = prepare_for_inference(
                copy.deepcopy(ours), quantize="int8", pack_weights=None if pack and not compile else False
            )
        except quant.QuantizeError as e:
            skipped.append((int8_pidec, str(e)))
    prepare_for_inference(ours, compile=compile, pack_weights=pack_weights)
    engines.packed = packing.is_packed(ours)
    kinds = {"int8" if is_int8(c) else "float" for c in configs if c.startswith("ct2-")}
    if kinds and why is None:
        engines.ct2 = peers.load_ct2(folder, tmp, ours.config, device, dtype, kinds)
    return engines, skipped
