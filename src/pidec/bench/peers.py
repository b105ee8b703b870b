"""The benchmark's peers: Hugging Face transformers and CTranslate2 decoding the same workload
from the same checkpoint. Each runner decodes one document and returns (generated tokens per
row, cross-cache bytes or None: a peer's cache size is counted analytically). A transformers or
CTranslate2 batch cannot let a row stop early, so every row runs the document's longest answer.
What each configuration runs: docs/performance.md ("Method").

CTranslate2 is an optional extra: where it is missing, `ct2_missing` says why and how to install
it, and the harness skips its configurations instead of failing.

The checkpoint has token ids, not text: CTranslate2's converter is given a vocabulary that names
each id ("t123"; the pad, EOS and an unknown token by their usual names), and the runners
translate id lists to those names and back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import checkpoint
from ..model import T5, T5Config
from ..quantize import quiet_import
from .workloads import DocDraw

CT2_INSTALL = 'pip install ".[ct2]"  (the ct2 extra, from a pidec checkout)'


# -- transformers -------------------------------------------------------------------------------


def load_hf(folder, device: torch.device, dtype: torch.dtype, ours: T5):
    """transformers' T5 from `folder`, set to decode like `ours`; RuntimeError when it does not
    hold the same weights as `ours` (the comparison would mean nothing)."""
    from transformers import T5ForConditionalGeneration

    with checkpoint.quiet_transformers():
        hf = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    cfg = ours.config
    hf.generation_config.pad_token_id = cfg.pad_token_id
    hf.generation_config.eos_token_id = cfg.eos_token_id
    hf.generation_config.decoder_start_token_id = cfg.decoder_start_token_id
    hf.generation_config.max_length = None
    head = ours.embed.weight if ours.lm_head is None else ours.lm_head.weight
    pairs = [
        (hf.lm_head.weight, head),
        (hf.shared.weight, ours.embed.weight),
        (hf.decoder.block[-1].layer[1].EncDecAttention.k.weight, ours.decoder.layers[-1].cross_attn.k.weight),
    ]
    for a, b in pairs:
        if a.shape != b.shape or not torch.equal(a.detach().cpu(), b.detach().cpu()):
            raise RuntimeError(f"transformers did not load the same weights from {folder}")
    return hf


def _pad(seqs: list[list[int]], pad: int, device, left: bool):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def run_hf_pie(ours: T5, hf, d: DocDraw, device):
    """K encoder rows (prompt + document, right-padded), every row the longest answer's L steps."""
    ids, mask = _pad([p + d.document for p in d.prompts], ours.config.pad_token_id, device, left=False)
    L = d.longest
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=L, min_new_tokens=L, num_beams=1, do_sample=False
    )
    return out[:, 1:].tolist(), None


def run_hf_pid_expanded(ours: T5, hf, d: DocDraw, device):
    """The document encoded once and `expand`-ed to K rows, the prompts as left-padded decoder
    input; transformers still projects the cross-attention keys/values for each row."""
    from transformers.modeling_outputs import BaseModelOutput

    pad, start = ours.config.pad_token_id, ours.config.decoder_start_token_id
    K, S = d.k, len(d.document)
    doc = torch.tensor([d.document], dtype=torch.long, device=device)
    enc = hf.get_encoder()(input_ids=doc).last_hidden_state  # [1, S, d_model], once
    dec_ids, dec_mask = _pad([[start] + p for p in d.prompts], pad, device, left=True)
    L = d.longest
    out = hf.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.expand(K, S, enc.shape[-1])),
        attention_mask=torch.ones((K, S), dtype=torch.long, device=device),
        decoder_input_ids=dec_ids,
        decoder_attention_mask=dec_mask,
        max_new_tokens=L,
        min_new_tokens=L,
        num_beams=1,
        do_sample=False,
    )
    return out[:, dec_ids.shape[1] :].tolist(), None


# -- CTranslate2 ----------------------------------------------------------------------------------


def ct2_missing() -> str | None:
    """Why the CTranslate2 configurations cannot run here, or None when they can."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as e:
        return f"ctranslate2 is not installed ({e}): {CT2_INSTALL}"
    return None


class IdVocabulary:
    """What ctranslate2's T5 converter asks of a tokenizer: one name per id, and the special tokens."""

    def __init__(self, cfg: T5Config):
        self.size = cfg.vocab_size
        unk = next(i for i in range(3) if i not in (cfg.pad_token_id, cfg.eos_token_id))
        self.special = {cfg.pad_token_id: "<pad>", cfg.eos_token_id: "</s>", unk: "<unk>"}
        self.ids = {name: i for i, name in self.special.items()}
        self.pad_token, self.eos_token, self.unk_token = "<pad>", "</s>", "<unk>"

    def token(self, i: int) -> str:
        return self.special.get(i) or f"t{i}"

    def id(self, token: str) -> int:
        return self.ids[token] if token in self.ids else int(token[1:])

    def get_vocab(self) -> dict[str, int]:
        return {self.token(i): i for i in range(self.size)}

    def convert_ids_to_tokens(self, i):
        return [self.token(x) for x in i] if isinstance(i, (list, tuple)) else self.token(i)


def convert_ct2(folder, out_dir, cfg: T5Config) -> IdVocabulary:
    """Convert the Hugging Face checkpoint `folder` with ctranslate2's TransformersConverter
    (float32 weights; int8 is chosen when loading, with compute_type)."""
    import ctranslate2

    vocab = IdVocabulary(cfg)

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return vocab

    with checkpoint.quiet_transformers(), quiet_import():  # transformers may import torchao, which logs
        Converter(str(folder)).convert(str(out_dir), force=True)
    return vocab


@dataclass
class Ct2:
    """One CTranslate2 translator, the vocabulary naming its ids, and its compute type."""

    translator: object
    vocab: IdVocabulary
    compute_type: str


def load_ct2(folder, tmp, cfg: T5Config, device: torch.device, dtype: str, kinds: set[str]) -> dict[str, Ct2]:
    """One translator per precision asked for ("float", "int8"), threads as torch's."""
    import ctranslate2

    out = os.path.join(tmp, "ct2")
    vocab = convert_ct2(folder, out, cfg)
    types = {"float": dtype, "int8": "int8" if dtype == "float32" else f"int8_{dtype}"}
    engines = {}
    for kind in sorted(kinds):
        tr = ctranslate2.Translator(
            out,
            device=device.type,
            device_index=device.index or 0,
            compute_type=types[kind],
            inter_threads=1,
            intra_threads=torch.get_num_threads() if device.type == "cpu" else 0,
        )
        engines[kind] = Ct2(tr, vocab, types[kind])
    return engines


def run_ct2_pie(ours: T5, ct2: Ct2, d: DocDraw, device):
    """K sources of prompt + document, every row the longest answer's L steps."""
    tok = ct2.vocab.token
    L = d.longest
    sources = [[tok(t) for t in p + d.document] for p in d.prompts]
    res = ct2.translator.translate_batch(
        sources, beam_size=1, max_decoding_length=L, min_decoding_length=L, max_input_length=0
    )
    return [[ct2.vocab.id(t) for t in r.hypotheses[0]] for r in res], None


def run_ct2_prefix(ours: T5, ct2: Ct2, d: DocDraw, device):
    """The document K times as sources, the prompts as `target_prefix` (left-padded to the
    longest, since CTranslate2's decoding length counts the prefix and is one number per batch)."""
    tok = ct2.vocab.token
    L, P = d.longest, max(len(p) for p in d.prompts)
    pad = tok(ours.config.pad_token_id)
    source = [tok(t) for t in d.document]
    prefixes = [[pad] * (P - len(p)) + [tok(t) for t in p] for p in d.prompts]
    res = ct2.translator.translate_batch(
        [source] * d.k,
        target_prefix=prefixes,
        beam_size=1,
        max_decoding_length=P + L,  # CTranslate2 counts the prefix in the decoding length
        min_decoding_length=P + L,
        max_input_length=0,
    )
    return [[ct2.vocab.id(t) for t in r.hypotheses[0][P:]] for r in res], None
