"""The Python API: `pidec.load(...)` returns a `Model` that takes text and gives text.

model = pidec.load("path/or/hub-id", device="cpu")  # dtype="auto": bf16 where the CPU has it
answers = model.generate(document, prompts, max_new_tokens=32, layout="pid")
batch = model.generate_batch([(document, prompts), ...])
enc = model.encode(document)            # reusable across calls
answers = model.generate(enc, prompts)  # decodes against it without re-encoding
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from . import checkpoint, layouts, lora
from .cpu import auto_dtype, dtype_choice
from .errors import InputError
from .generate import DecodeStats, Row, budget_ranges, decode, encode, sync
from .inference import check_inference_options, prepare_for_inference
from .layouts import Truncation
from .model import T5, CrossCache

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from its name; "auto" is what `pidec.cpu.auto_dtype` picks for `device`
    (bfloat16 where it is multiplied in hardware, float32 elsewhere)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # the device checked first: a bad name is named as such, not as a dtype problem
        return auto_dtype(checkpoint.check_device(device))
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: expected one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


@dataclass
class EncodedDocument:
    """A document's cross-attention cache, computed once; pass it to `Model.generate` in place
    of the text to decode new prompts without encoding again (pid layout)."""

    cross: CrossCache
    tokens: int
    truncation: Truncation | None = None
    encode_s: float = 0.0


@dataclass
class GenerationResult:
    """What `generate` and `generate_batch` return with return_details=True. `outputs` is what
    they return without it: `generate`'s list of answers (one per prompt), `generate_batch`'s
    list of such lists (one per example)."""

    outputs: list[str] | list[list[str]]
    usage: dict = field(default_factory=dict)  # document_tokens, prompt_tokens, output_tokens
    timings: dict = field(default_factory=dict)  # tokenize_ms, encode_ms, decode_ms, total_ms
    truncations: list[Truncation] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    example_output_tokens: list[int] = field(default_factory=list)  # per example, tokens generated (EOS not counted)
    runtime: dict = field(default_factory=dict)  # dtype and why (`Model.runtime`)

    def to_dict(self) -> dict:
        out = {
            "outputs": self.outputs,
            "usage": self.usage,
            "timings": self.timings,
            "truncations": [asdict(t) for t in self.truncations],
        }
        if self.runtime:
            out["runtime"] = self.runtime
        return out


class TextModel:
    """What the T5 `Model` and `pidec.causal.CausalModel` share behind `generate` and
    `generate_batch`, whose signatures each declares with its own options: a document given as
    text or encoded before (`encoded_type`), one budget for all prompts or one per prompt, the
    answers returned, or with return_details a `GenerationResult` holding them. A subclass
    implements `_generate_examples` (examples -> result, answers nested per example) and
    `_generate_encoded` (prompts over an encoded document -> result)."""

    encoded_type: type

    def _answer_document(self, document, prompts, max_new_tokens, num_beams, layout, truncate, return_details, options):
        """`generate`'s answers for one document, in prompt order (`options`: the model's own)."""
        if isinstance(document, self.encoded_type):
            result = self._generate_encoded(document, prompts, max_new_tokens, num_beams, layout, **options)
        else:
            per_example = [max_new_tokens] if isinstance(max_new_tokens, (list, tuple)) else max_new_tokens
            result = self._generate_examples([(document, prompts)], per_example, num_beams, layout, truncate, **options)
        result.outputs = result.outputs[0]  # one document: the flat list, with details or without
        return result if return_details else result.outputs

    def _answer_examples(self, examples, max_new_tokens, num_beams, layout, truncate, return_details, options):
        """`generate_batch`'s answers: one list per example, each in prompt order."""
        result = self._generate_examples(examples, max_new_tokens, num_beams, layout, truncate, **options)
        return result if return_details else result.outputs


class Model(TextModel):
    """A T5 with its tokenizer, decoding decomposed tasks in the seq, pie or pid layout."""

    encoded_type = EncodedDocument

    def __init__(self, model: T5, tokenizer, max_batch_tokens: int = 16384, dtype_choice: str = "as loaded"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch_tokens = max_batch_tokens  # encoder tokens encoded together in generate_batch
        self.dtype_choice = dtype_choice  # why this dtype (`pidec.cpu.dtype_choice`)

    @property
    def runtime(self) -> dict:
        """The dtype the model runs in and why: what `generate(..., return_details=True)` reports."""
        return {"dtype": str(self.model.dtype).removeprefix("torch."), "dtype_choice": self.dtype_choice}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        if getattr(self.model, "quantization", None):
            raise InputError("a quantized model is not saved: save the float checkpoint, quantize when loading it")
        checkpoint.save(self.model, folder, tokenizer=self.tokenizer)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, document: str, truncate: str | None = None) -> EncodedDocument:
        if not isinstance(document, str) or layouts.is_blank(document):
            raise InputError("document is empty" if isinstance(document, str) else "document must be a string")
        ids = layouts.encode_text(self.tokenizer, document)
        full = len(ids) + 1
        ids, cut = layouts.fit(ids, self.config.max_input_length, truncate, "document", [self.tokenizer.eos_token_id])
        t0 = time.perf_counter()
        cross = encode(self.model, [ids])
        return EncodedDocument(
            cross, len(ids), Truncation(0, None, truncate, full, len(ids)) if cut else None, time.perf_counter() - t0
        )

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        document: str | EncodedDocument,
        prompts: list[str],
        max_new_tokens: int | list[int] = 32,
        num_beams: int = 1,
        layout: str = "pid",
        truncate: str | None = None,
        return_details: bool = False,
        *,
        compaction: bool = True,
        length_penalty: float = 1.0,
        seq_instruction: str | None = None,
    ) -> list[str] | GenerationResult:
        """Answer every prompt about one document; outputs in prompt order.

        document: the text, or an `EncodedDocument` from `encode` (pid layout only).
        max_new_tokens: one budget for every prompt, or a list with one per prompt.
        num_beams: 1 for greedy decoding, more for beam search (transformers' scoring).
        layout: "pid" (the document encoded once, each prompt in the decoder), "pie" (each
        prompt in front of the document in the encoder) or "seq" (one output for all prompts).
        truncate: None (a document over the model's limit is an error), "left" or "right".
        return_details: return a `GenerationResult` (outputs, usage, timings, truncations,
        stats) instead of the list of answers; its `outputs` is that same flat list.
        compaction: rows that have ended leave the batch (False keeps them computing, to
        measure what compaction saves; the outputs are the same).
        length_penalty: beam search's exponent on the length when scoring finished beams.
        seq_instruction: the seq layout's text put before the document (None: its default)."""
        options = dict(compaction=compaction, length_penalty=length_penalty, seq_instruction=seq_instruction)
        return self._answer_document(
            document, prompts, max_new_tokens, num_beams, layout, truncate, return_details, options
        )

    def generate_batch(
        self,
        examples: list[tuple[str, list[str]]],
        max_new_tokens: int | list = 32,
        num_beams: int = 1,
        layout: str = "pid",
        truncate: str | None = None,
        return_details: bool = False,
        *,
        compaction: bool = True,
        length_penalty: float = 1.0,
        seq_instruction: str | None = None,
    ) -> list[list[str]] | GenerationResult:
        """Many documents, each with its own prompts, decoded together; one list of answers per
        example. The options are `generate`'s; with return_details, `outputs` is that nested list.

        max_new_tokens: an int for all, or one entry per example (an int, or one per prompt)."""
        options = dict(compaction=compaction, length_penalty=length_penalty, seq_instruction=seq_instruction)
        return self._answer_examples(examples, max_new_tokens, num_beams, layout, truncate, return_details, options)

    def _generate_examples(
        self,
        examples: list[tuple[str, list[str]]],
        max_new_tokens: int | list,
        num_beams: int,
        layout: str,
        truncate: str | None,
        *,
        compaction: bool,
        length_penalty: float,
        seq_instruction: str | None,
    ) -> GenerationResult:
        """Tokenize the examples into a plan, encode the documents in chunks of at most
        `max_batch_tokens` padded tokens, decode each chunk's rows, detokenize."""
        check_num_beams(num_beams)
        examples = check_examples(examples)
        t0 = time.perf_counter()
        cfg = self.config
        plan = layouts.build(
            self.tokenizer,
            examples,
            layout,
            max_new_tokens,
            cfg.max_input_length,
            cfg.decoder_start_token_id,
            truncate,
            seq_instruction,
        )
        layouts.check_decode_memory(plan, self.config, num_beams, self.model.dtype, self.device)
        t_tok = time.perf_counter() - t0

        options = dict(compaction=compaction, length_penalty=length_penalty)
        decode_chunk = functools.partial(self._decode_chunk, plan, num_beams, options)
        ranges = budget_ranges([len(d) for d in plan.docs], self.max_batch_tokens)
        tokens, stats = decode_by_chunks(plan.rows, ranges, decode_chunk)
        t2 = time.perf_counter()
        outputs = layouts.collect(plan, tokens, self.tokenizer)
        t_detok = time.perf_counter() - t2
        return GenerationResult(
            outputs,
            usage=token_usage(sum(len(d) for d in plan.docs), plan.prompt_tokens, tokens),
            timings=timings(t_tok + t_detok, stats, time.perf_counter() - t0),
            truncations=plan.truncations,
            stats=stats,
            example_output_tokens=_example_output_tokens(plan, tokens),
            runtime=self.runtime,
        )

    def _decode_chunk(self, plan: layouts.Plan, num_beams: int, options: dict, doc_lo: int, doc_hi: int, index):
        """`decode_by_chunks`' step: the plan's documents [doc_lo, doc_hi) encoded, the rows at
        `index` decoded against them; returns their tokens and the stats (encoding's time in)."""
        t1 = time.perf_counter()
        cross = encode(self.model, plan.docs[doc_lo:doc_hi])
        sync(self.device)
        enc_s = time.perf_counter() - t1
        rows = [Row(plan.rows[k].doc - doc_lo, plan.rows[k].prefix, plan.rows[k].max_new_tokens) for k in index]
        out = decode(self.model, cross, rows, num_beams, **options)
        out.stats.encode_s = enc_s
        return out.tokens, out.stats

    def _generate_encoded(
        self,
        enc: EncodedDocument,
        prompts: list[str],
        max_new_tokens: int | list[int],
        num_beams: int,
        layout: str,
        *,
        compaction: bool,
        length_penalty: float,
        seq_instruction: str | None = None,
    ) -> GenerationResult:
        """Prompts decoded against an encoded document (pid layout only, so no seq_instruction)."""
        if layout != "pid":
            raise InputError(
                f"an encoded document decodes in the pid layout only (got layout={layout!r}): "
                "pie puts each prompt in the encoder, seq needs its own encoder input"
            )
        check_num_beams(num_beams)
        t0 = time.perf_counter()
        plan = layouts.build_encoded(self.tokenizer, prompts, max_new_tokens, self.config.decoder_start_token_id)
        layouts.check_decode_memory(plan, self.config, num_beams, self.model.dtype, self.device)
        t_tok = time.perf_counter() - t0
        out = decode(self.model, enc.cross, plan.rows, num_beams, compaction=compaction, length_penalty=length_penalty)
        t1 = time.perf_counter()
        outputs = layouts.collect(plan, out.tokens, self.tokenizer)
        t_tok += time.perf_counter() - t1
        return GenerationResult(
            outputs,
            token_usage(enc.tokens, plan.prompt_tokens, out.tokens),
            timings(t_tok, out.stats, time.perf_counter() - t0),
            stats=out.stats,
            example_output_tokens=_example_output_tokens(plan, out.tokens),
            runtime=self.runtime,
        )


def decode_by_chunks(rows, ranges, decode_chunk) -> tuple[list[list[int]], DecodeStats]:
    """Decode a plan's `rows` one chunk of documents at a time, so that the encoder output (or
    the prefilled prefixes) of only one chunk is held: for each (lo, hi) of `ranges` (as
    `generate.budget_ranges` cuts the documents by a token budget), `decode_chunk(lo, hi, index)`
    decodes the rows at positions `index` (those whose document is in [lo, hi)) and returns their
    tokens in that order and the chunk's stats. Returns the tokens per row, in `rows` order, and
    the stats of all chunks added up."""
    stats = DecodeStats()
    tokens: list[list[int]] = [[] for _ in rows]
    for lo, hi in ranges:
        index = [k for k, r in enumerate(rows) if lo <= r.doc < hi]
        chunk_tokens, chunk_stats = decode_chunk(lo, hi, index)
        stats.add(chunk_stats)
        for k, toks in zip(index, chunk_tokens):
            tokens[k] = toks
    return tokens, stats


def token_usage(document_tokens: int, prompt_tokens: int, tokens: list[list[int]]) -> dict:
    """A call's `usage` (as `GenerationResult.usage` and the service report it): the document and
    prompt tokens given, and the tokens generated over all `tokens` rows (EOS not counted)."""
    return {
        "document_tokens": document_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens": sum(len(t) for t in tokens),
    }


def _example_output_tokens(plan: layouts.Plan, tokens: list[list[int]]) -> list[int]:
    counts = [0] * len(plan.prompts)
    for (example, _), toks in zip(plan.owner, tokens):
        counts[example] += len(toks)
    return counts


def check_num_beams(num_beams) -> None:
    """InputError unless num_beams is an integer >= 1."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise InputError(f"num_beams must be an integer >= 1, got {num_beams!r}")


def check_examples(examples, encoded: type | None = None) -> list[tuple[str, list[str]]]:
    """`generate_batch`'s examples as (document, prompts) pairs, refusing anything else by its
    position; a document already encoded (`encoded`, default EncodedDocument) goes to generate()."""
    encoded = EncodedDocument if encoded is None else encoded
    if isinstance(examples, tuple) and len(examples) == 2 and isinstance(examples[0], str):
        raise InputError("generate_batch takes a list of (document, prompts) pairs; use generate for one")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, (tuple, list)) or len(ex) != 2:
            raise InputError(f"example {i}: expected a (document, prompts) pair")
        if isinstance(ex[0], encoded):
            raise InputError(f"example {i}: encoded documents go to generate(), one at a time")
        out.append((ex[0], ex[1]))
    return out


def timings(text_s: float, stats: DecodeStats, total_s: float) -> dict:
    """A call's `timings` in ms: tokenizing and detokenizing (`text_s`), encoding and decoding
    (from `stats`), and the whole call."""
    return {
        "tokenize_ms": round(text_s * 1e3, 3),
        "encode_ms": round(stats.encode_s * 1e3, 3),
        "decode_ms": round(stats.decode_s * 1e3, 3),
        "total_ms": round(total_s * 1e3, 3),
    }


# Other model families: (accepts(folder) -> bool, load(folder, device, dtype, tokenizer,
# max_input_length, quantize, compile, pack_weights) -> model). `pidec.causal.api` registers the
# decoder-only checkpoints (Llama, Qwen2, Qwen3, Mistral) here, by config.json's model_type.
LOADERS: list = []


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    tokenizer: str | os.PathLike | None = None,
    max_input_length: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
    pack_weights: bool | None = None,
) -> Model:
    """Load a Hugging Face T5 checkpoint folder (or hub id) and its tokenizer. A LoRA adapter
    folder (adapter_config.json, no config.json) loads its base and merges the adapter in.

    dtype: "auto" (the default) is bfloat16 on a CPU that multiplies it in hardware (AMX or
    AVX-512 bf16) or a GPU that supports it, float32 elsewhere (`pidec.cpu.auto_dtype`); the
    model's `dtype_choice` and `generate`'s details say which and why. A named dtype
    (torch.float32, "float32", "bfloat16", ...) is taken as given: float32 stays exact.
    tokenizer: a folder to take the tokenizer from when the checkpoint has none.
    max_input_length: the longest document accepted without truncation (default: config.json's
    n_positions, else 512).
    quantize: None, or "int8": int8 weights and dynamically quantized int8 activations in every
    linear layer but the LM head, for inference (see `pidec.quantize`).
    compile: decode through torch.compile (`generate.compile_steps`): the first generation
    compiles (about a minute for T5 small or base on two CPU cores); on that CPU it was not
    faster over a whole document than the packed eager default (docs/performance.md); not with
    quantize.
    pack_weights: keep a oneDNN-packed copy of each float32 linear weight for CPU inference
    (`pidec.packing`): decoding steps and encoding run faster, the linear weights are held
    twice (with quantize, only the float LM head is packed). None (the default): on for a
    float32 model on the CPU that is not compiled, where torch has oneDNN; True where that does
    not hold is an error."""

    quantize = check_inference_options(quantize, compile)
    overrides = {} if max_input_length is None else {"max_input_length": int(max_input_length)}
    folder = checkpoint.resolve(path)
    for accepts, family_load in LOADERS:  # a registered family (decoder-only models) loads its own
        if accepts(folder):
            return family_load(folder, device, dtype, tokenizer, max_input_length, quantize, compile, pack_weights)
    if lora.is_adapter(folder):  # a LoRA adapter: its base with the deltas merged in, tokenizer from either
        model = lora.load_merged(folder, device=device, dtype=parse_dtype(dtype, device), **overrides)
        folder = lora.tokenizer_folder(folder) or folder
    else:
        model = checkpoint.load_model(folder, device=device, dtype=parse_dtype(dtype, device), **overrides)
    tok_source = tokenizer if tokenizer is not None else folder
    if tokenizer is None and not any(
        (folder / f).exists() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    ):
        raise checkpoint.CheckpointError(
            f"{folder}: no tokenizer files (tokenizer.json, spiece.model); pass tokenizer=FOLDER"
        )
    tok = checkpoint.load_tokenizer(tok_source)
    checkpoint.check_tokenizer(tok, model.config, str(tok_source))
    prepare_for_inference(model, quantize, compile, pack_weights)
    return Model(model, tok, dtype_choice=dtype_choice(dtype, device))
