"""The Python API for decoder-only checkpoints: what `pidec.load` returns for a Llama, Qwen2,
Qwen3 or Mistral folder. Same surface as the T5 `Model`:

model = pidec.load("path/to/llama")                 # config.json's model_type picks this class
answers = model.generate(document, prompts, max_new_tokens=32, layout="pid")
batch = model.generate_batch([(document, prompts), ...])
enc = model.encode(document)                        # the document's prefilled prefix, reusable
answers = model.generate(enc, prompts)              # decodes over it without prefilling again

Rows are built by a `Template` (plain `prefix_template` + `row_template`, or the tokenizer's
chat template with `chat=True`): set `model.template`, or pass `template=` (or its fields) to a
call. `layout` is `pid` (the document's prefix prefilled once, shared by all rows) or `pie` (each
row prefilled whole). Greedy by default; `do_sample=True` with `temperature`, `top_k`, `top_p`
and `seed` samples. Beam search is not implemented for these models (`num_beams` must be 1).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields

import torch

from .. import api, checkpoint, packing
from .. import quantize as quant
from ..errors import InputError
from ..generate import DecodeStats, budget_ranges, sync
from ..layouts import Truncation
from ..model import CrossCache
from . import checkpoint as causal_checkpoint
from . import layouts as causal_layouts
from .generate import Sampling, decode, truncate_prefix
from .layouts import Template
from .model import CausalLM

TEMPLATE_FIELDS = tuple(f.name for f in fields(Template))
SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))


@dataclass
class EncodedPrefix:
    """A document's prefix (the template's text before the prompt), prefilled once; pass it to
    `CausalModel.generate` in place of the text. Rows use as much of it as their tokens share."""

    document: str
    tokens: list[int]
    cache: CrossCache
    template: Template
    truncation: Truncation | None = None
    encode_s: float = 0.0


class CausalModel(api.TextModel):
    """A decoder-only LM with its tokenizer, answering many prompts about one document over one
    shared prefix cache (pid) or row by row (pie)."""

    encoded_type = EncodedPrefix

    def __init__(self, model: CausalLM, tokenizer, template: Template | None = None, max_batch_tokens: int = 16384):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.template = template or Template()
        self.eos_token_ids = causal_checkpoint.eos_ids(model.config, tokenizer)
        self.max_batch_tokens = max_batch_tokens  # prefix tokens prefilled together in generate_batch

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_name(self) -> str:
        cfg = self.config
        if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
            return f"sliding_window of {cfg.sliding_window} (pidec does not implement the window)"
        return f"context length of {cfg.max_position_embeddings} (max_position_embeddings)"

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        if quant.is_quantized(self.model):
            raise InputError("a quantized model is not saved: save the float checkpoint, quantize when loading it")
        causal_checkpoint.save(self.model, folder, tokenizer=self.tokenizer)

    def _template(self, template: Template | None, options: dict) -> Template:
        base = template or self.template
        picked = {k: options.pop(k) for k in TEMPLATE_FIELDS if k in options}
        return Template(**{**{f: getattr(base, f) for f in TEMPLATE_FIELDS}, **picked}).check(self.tokenizer)

    def _sampling(self, options: dict) -> Sampling:
        picked = {k: options.pop(k) for k in SAMPLING_FIELDS if k in options}
        if options:
            raise InputError(f"unknown option(s) {', '.join(sorted(options))} for a decoder-only model")
        try:
            return Sampling(**picked).check()
        except ValueError as e:
            raise InputError(str(e)) from None

    # -- the shared prefix -----------------------------------------------------------------

    def encode(self, document: str, truncate: str | None = None, template: Template | None = None, **options):
        """Prefill the document's prefix once: the template's tokens before the prompt."""
        template = self._template(template, options)
        if options:
            raise InputError(f"unknown option(s) {', '.join(sorted(options))} for encode")
        if not isinstance(document, str) or not document.strip():
            raise InputError("document is empty" if isinstance(document, str) else "document must be a string")
        ids = template.prefix_ids(self.tokenizer, document)
        cut = None
        limit = self.config.max_input_length
        if len(ids) > limit:
            if truncate is None:
                raise InputError(
                    f"document prefix is {len(ids)} tokens, longer than the model's limit of {limit} "
                    "(max_input_length); pass truncate='left' or 'right'"
                )
            if truncate not in ("left", "right"):
                raise InputError(f"truncate={truncate!r}: expected None, 'left' or 'right'")
            full, removed = len(ids), 0
            for _ in range(8):  # re-tokenizing the cut text can merge differently: cut again if needed
                removed += len(ids) - limit
                text = causal_layouts.cut_document(self.tokenizer, document, removed, truncate)
                ids = template.prefix_ids(self.tokenizer, text)
                if len(ids) <= limit:
                    break
            else:  # pragma: no cover - a tokenizer that grows as it is cut
                raise InputError(f"could not cut the document to {limit} tokens")
            document = text
            cut = Truncation(0, None, truncate, full, len(ids))
        t0 = time.perf_counter()
        cache = self.model.prefill_prefix([ids])
        sync(self.device)
        return EncodedPrefix(document, ids, cache, template, cut, time.perf_counter() - t0)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        document: str | EncodedPrefix,
        prompts: list[str],
        max_new_tokens: int | list[int] = 32,
        num_beams: int = 1,
        layout: str = "pid",
        truncate: str | None = None,
        return_details: bool = False,
        **options,
    ):
        """Answer every prompt about one document; outputs in prompt order. The options are the
        template's fields (or `template=`) and the sampling's (`Sampling`)."""
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
        **options,
    ):
        """Many documents, each with its own prompts, decoded together (ragged)."""
        return self._answer_examples(examples, max_new_tokens, num_beams, layout, truncate, return_details, options)

    def _generate_examples(
        self, examples, max_new_tokens, num_beams, layout, truncate, template=None, compaction=True, **options
    ) -> api.GenerationResult:
        """Plan the examples' rows, decode them, and the answers per example (`generate_batch`)."""
        check_beams(num_beams)
        if not compaction:
            raise InputError("compaction=False is not offered for decoder-only models: rows always leave when done")
        template = self._template(template, options)
        sampling = self._sampling(options)
        t0 = time.perf_counter()
        plan = self.plan(examples, max_new_tokens, layout, truncate, template)
        t_tok = time.perf_counter() - t0
        tokens, stats = self.decode_plan(plan, sampling)
        t2 = time.perf_counter()
        outputs = self.answers(plan, tokens)
        t_text = t_tok + time.perf_counter() - t2
        return api.GenerationResult(
            outputs,
            usage=usage(plan, tokens),
            timings=api.timings(t_text, stats, time.perf_counter() - t0),
            truncations=plan.truncations,
            stats=stats,
        )

    def plan(
        self,
        examples: list[tuple[str, list[str]]],
        max_new_tokens: int | list = 32,
        layout: str = "pid",
        truncate: str | None = None,
        template: Template | None = None,
        check_length: bool = True,
    ) -> causal_layouts.CausalPlan:
        """Tokenize examples into the rows `decode_plan` decodes (what `generate_batch` does first).
        check_length=False leaves the rows' lengths unchecked, for a caller with limits of its
        own (the service): it must then keep every row + budget within the model's context."""
        examples = api.check_examples(examples, EncodedPrefix)
        cfg = self.config
        unlimited = 1 << 30
        return causal_layouts.build(
            self.tokenizer,
            (template or self.template).check(self.tokenizer),
            examples,
            layout,
            max_new_tokens,
            cfg.max_input_length if check_length else unlimited,
            cfg.context_length if check_length else unlimited,
            self.context_name,
            truncate,
        )

    def decode_plan(
        self, plan: causal_layouts.CausalPlan, sampling: Sampling | None = None, should_stop=None
    ) -> tuple[list[list[int]], DecodeStats]:
        """Decode a plan's rows (pid: its documents' prefixes prefilled together, in chunks of
        up to max_batch_tokens prefix tokens). Returns the tokens per row and the run's stats.
        should_stop: asked before every decoding step; True raises `pidec.generate.Aborted`."""
        sizes = [len(p) for p in plan.prefixes]
        pid = plan.layout == "pid"

        def decode_chunk(lo: int, hi: int, index: list[int]):
            rows = [plan.rows[k] for k in index]
            t1 = time.perf_counter()
            prefix = None
            if pid:
                prefix = self.model.prefill_prefix(plan.prefixes[lo:hi])
                rows = [type(r)(r.doc - lo, r.tokens, r.max_new_tokens) for r in rows]
            sync(self.device)
            enc_s = time.perf_counter() - t1
            out = decode(self.model, prefix, rows, self.eos_token_ids, sampling, should_stop)
            out.stats.encode_s = enc_s
            out.stats.document_tokens = sum(sizes[lo:hi])
            return out.tokens, out.stats

        ranges = budget_ranges(sizes, self.max_batch_tokens) if pid else [(0, len(sizes))]
        return api.decode_by_chunks(plan.rows, ranges, decode_chunk)

    def answers(self, plan: causal_layouts.CausalPlan, tokens: list[list[int]]) -> list[list[str]]:
        """Tokens per row -> answers per example, in prompt order."""
        return causal_layouts.collect(plan, tokens, self.tokenizer)

    def _generate_encoded(self, enc: EncodedPrefix, prompts, max_new_tokens, num_beams, layout, **options):
        if layout != "pid":
            raise InputError(f"an encoded document decodes in the pid layout only (got layout={layout!r})")
        check_beams(num_beams)
        if any(k in options for k in TEMPLATE_FIELDS) or options.get("template"):
            raise InputError("an encoded document keeps the template it was encoded with")
        options.pop("template", None)
        sampling = self._sampling(options)
        t0 = time.perf_counter()
        plan, shared = causal_layouts.build_on_prefix(
            self.tokenizer,
            enc.template,
            enc.document,
            enc.tokens,
            prompts,
            max_new_tokens,
            self.config.max_input_length,
            self.config.context_length,
            self.context_name,
        )
        t_tok = time.perf_counter() - t0
        out = decode(self.model, truncate_prefix(enc.cache, shared), plan.rows, self.eos_token_ids, sampling)
        out.stats.document_tokens = shared
        t1 = time.perf_counter()
        outputs = self.answers(plan, out.tokens)
        t_tok += time.perf_counter() - t1
        return api.GenerationResult(
            outputs, usage(plan, out.tokens), api.timings(t_tok, out.stats, time.perf_counter() - t0), stats=out.stats
        )


def use_template(model, template: Template | None) -> None:
    """Give a loaded model the row template `template` (None: leave it). Decoder-only models
    only: a T5 `Model` is an InputError naming the options, as is a chat template asked of a
    tokenizer without one."""
    if template is None:
        return
    if not isinstance(model, CausalModel):
        raise InputError(
            "prefix_template, row_template and chat templates are for decoder-only checkpoints "
            "(llama, qwen2, qwen3, mistral); this is a T5 checkpoint, whose prompts go in the decoder as they are"
        )
    model.template = template.check(model.tokenizer)


def check_beams(num_beams) -> None:
    """InputError unless num_beams is 1 (beam search is T5's only)."""
    api.check_num_beams(num_beams)
    if num_beams > 1:
        raise InputError(
            f"num_beams={num_beams}: beam search is not implemented for decoder-only models; "
            "use greedy (num_beams=1) or do_sample=True"
        )


def example_usage(plan: causal_layouts.CausalPlan, tokens: list[list[int]]) -> list[dict]:
    """`usage` per example of the plan: what `generate` reports for that example alone."""
    out = [{"document_tokens": d, "prompt_tokens": p, "output_tokens": 0} for d, p in plan.example_tokens]
    for (i, _), t in zip(plan.owner, tokens):
        out[i]["output_tokens"] += len(t)
    return out


def usage(plan: causal_layouts.CausalPlan, tokens: list[list[int]]) -> dict:
    """The plan's `api.token_usage` (its shared prefixes counted once as document tokens)."""
    return api.token_usage(plan.document_tokens, plan.prompt_tokens, tokens)


def load(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | os.PathLike | None = None,
    max_input_length: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
    pack_weights: bool | None = None,
    template: Template | None = None,
) -> CausalModel:
    """A decoder-only checkpoint folder and its tokenizer as a `CausalModel` (what `pidec.load`
    returns for one). max_input_length: the longest row (document + prompt) accepted without
    truncation (default: the model's context). quantize='int8' and pack_weights as for T5;
    compile is not offered for these models."""
    if compile:
        raise InputError("compile=True is not offered for decoder-only models yet")
    try:
        quantize = quant.check_method(quantize)
    except quant.QuantizeError as e:
        raise InputError(str(e)) from None
    folder = checkpoint.resolve(folder)
    overrides = {} if max_input_length is None else {"max_input_length": int(max_input_length)}
    model = causal_checkpoint.load_model(folder, device=device, dtype=api.parse_dtype(dtype, device), **overrides)
    tok_source = tokenizer if tokenizer is not None else folder
    if tokenizer is None and not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise checkpoint.CheckpointError(f"{folder}: no tokenizer files (tokenizer.json); pass tokenizer=FOLDER")
    tok = checkpoint.load_tokenizer(tok_source)
    if len(tok) > model.config.vocab_size:
        raise checkpoint.CheckpointError(
            f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    if quantize is not None:
        try:
            quant.quantize_model(model.eval(), quantize)
        except quant.QuantizeError as e:
            raise InputError(str(e)) from None
    can_pack = packing.supported(model.device, model.dtype)
    if pack_weights and not can_pack:
        raise InputError("pack_weights=True needs a float32 model on the CPU and torch with oneDNN")
    if pack_weights is None:
        pack_weights = can_pack
    if pack_weights:
        packing.pack(model)
    return CausalModel(model, tok, template)


# `pidec.load` hands a folder whose config.json names a non-T5 model_type to this module
api.LOADERS.append((causal_checkpoint.is_causal, load))
