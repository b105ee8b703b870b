"""seq / pie / pid: how one example (a document and its subtask prompts) becomes model rows.

- `pid`: the document is encoded once (document tokens + EOS); each subtask is one decoder row
  `[decoder_start] + prompt tokens`, and its answer is what the row generates after the prompt.
- `pie`: K encoder rows `tokenizer(prompt + " " + document)`, each decoded from `[decoder_start]`.
- `seq`: one encoder row (the document, after an optional instruction) and one decoder row whose
  output holds every answer as `prompt1: answer1; prompt2: answer2; ...` (SEQ_FORMAT), parsed
  back by `parse_seq`.

A layout is data (`Plan`) handed to the one decoding engine, not a separate path through the
model. Training (`TrainTokenizer`) builds the same rows with targets appended.

User text is text: every document, prompt and target is tokenized by `encode_text`, which
keeps special-token strings typed in the text (`</s>`, `<pad>`, `<extra_id_0>`) as the text
they are, so that a prompt or document cannot inject an EOS, a pad or a sentinel. The
tokenizer is called with `split_special_tokens=True` (no added-token matching); where its model
still produces a control piece from the characters (T5's Unigram vocabulary holds `</s>` as a
piece), that piece is spelt out: its first character alone (unknown to T5, so `<unk>`, as
SentencePiece itself encodes `<`) and the rest re-tokenized, which is what the sentencepiece
model T5 was trained with gives: `</s>` -> `<unk> / s >`. ByT5 and byte-level BPE tokenizers
give the bytes. Only the code places control tokens (the EOS after a document, the decoder
start before a prompt). The same function serves generation (library, CLI and service) and
training, so both see the same ids. `<unk>` may come out of text, as SentencePiece gives it for
unknown characters (a typed `<unk>` may become that token itself: it controls nothing).

A document or prompt with nothing visible (only whitespace, zero-width or other format
characters, see `is_blank`) is refused.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import torch

from .checkpoint import available_memory
from .errors import InputError
from .generate import Row

LAYOUTS = ("pid", "pie", "seq")
TRUNCATE = (None, "left", "right")
SEQ_SEPARATOR = "; "
SEQ_FORMAT = "prompt1: answer1; prompt2: answer2; ..."


@dataclass
class Truncation:
    example: int
    subtask: int | None  # pie: the row whose prompt + document was cut; else None
    side: str
    original_tokens: int
    kept_tokens: int


@dataclass
class Plan:
    layout: str
    docs: list[list[int]]  # encoder rows
    rows: list[Row]  # decoder rows, ordered by document
    owner: list[tuple[int, int]]  # per row: (example, subtask); seq rows: (example, -1)
    prompts: list[list[str]]  # per example, for parsing seq output
    truncations: list[Truncation] = field(default_factory=list)
    prompt_tokens: int = 0


# Characters that draw nothing but are not whitespace nor of a format category (Cf).
_INVISIBLE = frozenset("\u034f\u115f\u1160\u2800\u3164\uffa0")


def is_blank(text: str) -> bool:
    """True if `text` shows nothing: only whitespace, control, format (zero-width space and
    joiners, BOM, soft hyphen, bidi marks) or other invisible characters."""
    return all(
        c.isspace() or c in _INVISIBLE or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text
    )


def control_ids(tokenizer) -> frozenset[int]:
    """Ids only the code may place: the tokenizer's special tokens (EOS, pad, sentinels, ...)
    but `<unk>`, which text may produce."""
    ids = set(tokenizer.all_special_ids)
    ids.discard(tokenizer.unk_token_id)
    return frozenset(ids)


def encode_text(tokenizer, texts, control: frozenset[int] | None = None):
    """Token ids of user text (a string, or a list of strings), no EOS added, special-token
    strings kept as text (see the module's docstring). `control`: `control_ids(tokenizer)`,
    when the caller holds it."""
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    if not batch:
        return []
    out = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    control = control_ids(tokenizer) if control is None else control
    out = [ids if control.isdisjoint(ids) else _spell_out(tokenizer, ids, control) for ids in out]
    return out[0] if single else out


def _spell_out(tokenizer, ids: list[int], control: frozenset[int]) -> list[int]:
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    out: list[int] = []
    for i in ids:
        if i in control:
            out += _piece_as_text(tokenizer, model, tokenizer.convert_ids_to_tokens(i), control)
        else:
            out.append(i)
    return out


def _piece_as_text(tokenizer, model, piece: str, control: frozenset[int]) -> list[int]:
    first = tokenizer.convert_tokens_to_ids(piece[0])
    if first is None or first in control:
        first = tokenizer.unk_token_id
        if first is None:
            raise InputError(f"the text holds {piece!r}, a control token this tokenizer cannot write as text")
    rest = piece[1:]
    if not rest:
        return [first]
    if model is not None:
        ids = [t.id for t in model.tokenize(rest)]
    else:
        ids = [tokenizer.convert_tokens_to_ids(c) for c in rest]
        ids = [tokenizer.unk_token_id if i is None else i for i in ids]
    out = [first]
    for i in ids:
        out += _piece_as_text(tokenizer, model, tokenizer.convert_ids_to_tokens(i), control) if i in control else [i]
    return out


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return layout


def check_prompts(prompts, example: int = 0) -> list[str]:
    if isinstance(prompts, str):
        raise InputError(f"example {example}: prompts must be a list of strings, got one string")
    prompts = list(prompts)
    if not prompts:
        raise InputError(f"example {example}: empty prompt list (give at least one prompt)")
    for j, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"example {example}: prompt {j} is {type(p).__name__}, expected a string")
        if is_blank(p):
            raise InputError(f"example {example}: prompt {j} is empty or whitespace (nothing visible)")
    return prompts


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def budgets(max_new_tokens, k: int, example: int = 0) -> list[int]:
    """One token budget per prompt: an int for all of them, or a list with one per prompt."""
    if _positive_int(max_new_tokens):
        return [max_new_tokens] * k
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != k:
            raise InputError(f"example {example}: {len(max_new_tokens)} max_new_tokens values for {k} prompts")
        for j, n in enumerate(max_new_tokens):
            if not _positive_int(n):
                raise InputError(f"example {example}: max_new_tokens[{j}] must be an integer >= 1, got {n!r}")
        return list(max_new_tokens)
    raise InputError(f"max_new_tokens must be an integer >= 1 (or one per prompt), got {max_new_tokens!r}")


def check_decode_memory(plan: Plan, config, num_beams: int, dtype: torch.dtype, device) -> None:
    """Refuse a decoding whose self-attention cache cannot fit in the memory free on `device`,
    before anything is allocated: every row of the plan (times its beams) holds keys and values
    for its prompt and its whole max_new_tokens budget in every decoder layer (an upper bound
    where the rows are decoded in several batches)."""
    if not plan.rows:
        return
    biggest = max(r.max_new_tokens for r in plan.rows)
    capacity = max(len(r.prefix) for r in plan.rows) + biggest
    rows = len(plan.rows) * num_beams
    element = torch.empty((), dtype=dtype).element_size()
    need = 2 * config.num_decoder_layers * rows * config.num_heads * config.d_kv * capacity * element
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        raise InputError(
            f"max_new_tokens={biggest}: {len(plan.rows)} row(s) x {num_beams} beam(s) would need a "
            f"{need / 2**30:.1f} GiB decoder cache, and {free / 2**30:.1f} GiB are free on {device}; "
            "lower max_new_tokens"
        )


def fit(ids: list[int], limit: int, truncate: str | None, what: str, keep_end: list[int]) -> tuple[list[int], bool]:
    """Make `ids + keep_end` fit in `limit` tokens: cut `ids` on one side only when asked."""
    if truncate not in TRUNCATE:
        raise InputError(f"truncate={truncate!r}: expected None, 'left' or 'right'")
    total = len(ids) + len(keep_end)
    if total <= limit:
        return ids + keep_end, False
    if truncate is None:
        raise InputError(
            f"{what} is {total} tokens, longer than the model's limit of {limit} (max_input_length); "
            "pass truncate='left' or 'right' to cut it, or raise max_input_length"
        )
    room = limit - len(keep_end)
    if room < 1:
        raise InputError(f"{what}: nothing of the document fits in {limit} tokens after {len(keep_end)} fixed tokens")
    kept = ids[:room] if truncate == "right" else ids[len(ids) - room :]
    return kept + keep_end, True


def build(
    tokenizer,
    examples: list[tuple[str, list[str]]],
    layout: str,
    max_new_tokens: int | list,
    max_input_length: int,
    decoder_start_token_id: int,
    truncate: str | None = None,
    seq_instruction: str | None = None,
) -> Plan:
    """Tokenize examples into encoder rows and decoder rows for `layout`.

    max_new_tokens: an int for every subtask, or a list with one entry per example, each an int
    or a list with one budget per prompt."""
    check_layout(layout)
    eos = tokenizer.eos_token_id
    control = control_ids(tokenizer)
    plan = Plan(layout, [], [], [], [])
    for i, document, prompts, limits in checked_examples(examples, max_new_tokens):
        plan.prompts.append(prompts)
        prompt_ids = encode_text(tokenizer, prompts, control)
        plan.prompt_tokens += sum(len(p) for p in prompt_ids)
        if layout == "pie":
            _pie(
                plan,
                tokenizer,
                i,
                document,
                prompts,
                prompt_ids,
                limits,
                max_input_length,
                decoder_start_token_id,
                truncate,
                eos,
            )
            continue
        text = document if layout == "pid" or not seq_instruction else f"{seq_instruction} {document}"
        ids = encode_text(tokenizer, text, control)
        full = len(ids) + 1
        ids, cut = fit(ids, max_input_length, truncate, f"example {i}: document", [eos])
        if cut:
            plan.truncations.append(Truncation(i, None, truncate, full, len(ids)))
        _shared_document_rows(plan, i, ids, prompt_ids, limits, decoder_start_token_id)
    return plan


def check_examples_and_budgets(examples: list, max_new_tokens: int | list) -> None:
    """Refuse an empty batch, a budget list of the wrong length, or a bad single budget, before any
    tokenizing: public, so that every layout builder checks them the same way."""
    if not examples:
        raise InputError("no examples given")
    if isinstance(max_new_tokens, (list, tuple)) and len(max_new_tokens) != len(examples):
        raise InputError(f"{len(max_new_tokens)} max_new_tokens entries for {len(examples)} examples")
    if not isinstance(max_new_tokens, (list, tuple)):
        budgets(max_new_tokens, 1)


def checked_examples(examples: list, max_new_tokens: int | list):
    """Each example as (index, document, prompts, budgets), checked: the batch and its budgets
    first (before any tokenizing), then each document, its prompts and its budget per prompt.
    Every layout builder (T5's and the decoder-only one) walks its examples through this."""
    check_examples_and_budgets(examples, max_new_tokens)
    for i, (document, prompts) in enumerate(examples):
        check_document(document, i)
        prompts = check_prompts(prompts, i)
        budget = max_new_tokens[i] if isinstance(max_new_tokens, (list, tuple)) else max_new_tokens
        yield i, document, prompts, budgets(budget, len(prompts), i)


def check_document(document, example: int) -> None:
    """Refuse a document that is not a string or has nothing visible in it (example: its index)."""
    if not isinstance(document, str):
        raise InputError(f"example {example}: document is {type(document).__name__}, expected a string")
    if is_blank(document):
        raise InputError(f"example {example}: document is empty (nothing visible)")


def _shared_document_rows(plan: Plan, example: int, doc_ids, prompt_ids, limits: list[int], start: int) -> None:
    """The pid and seq layouts: one encoder row for the example (`doc_ids`, already fitted), then
    one decoder row per prompt (pid) or one row holding every subtask's answer (seq)."""
    d = len(plan.docs)
    plan.docs.append(doc_ids)
    if plan.layout == "pid":
        _pid_rows(plan, example, d, prompt_ids, limits, start)
    else:  # seq: room for "prompt: answer; " per subtask
        budget = sum(len(p) + n + 2 for p, n in zip(prompt_ids, limits))
        plan.rows.append(Row(d, [start], budget))
        plan.owner.append((example, -1))


def _pid_rows(plan: Plan, example: int, doc: int, prompt_ids, limits: list[int], start: int) -> None:
    for j, (p, n) in enumerate(zip(prompt_ids, limits)):
        plan.rows.append(Row(doc, [start] + p, n))
        plan.owner.append((example, j))


def build_encoded(tokenizer, prompts: list[str], max_new_tokens: int | list[int], decoder_start_token_id: int) -> Plan:
    """pid rows for one document that is already encoded (its cache is document 0)."""
    prompts = check_prompts(prompts)
    limits = budgets(max_new_tokens, len(prompts))
    prompt_ids = encode_text(tokenizer, prompts)
    plan = Plan("pid", [], [], [], [prompts], prompt_tokens=sum(len(p) for p in prompt_ids))
    _pid_rows(plan, 0, 0, prompt_ids, limits, decoder_start_token_id)
    return plan


def _pie(plan, tokenizer, i, document, prompts, prompt_ids, limits, limit, start, truncate, eos):
    texts = [f"{p} {document}" for p in prompts]
    rows = [ids + [eos] for ids in encode_text(tokenizer, texts)]
    doc_ids = None  # the document alone, tokenized once if some row must be cut
    for j, ids in enumerate(rows):
        if len(ids) > limit:
            if truncate is None:
                fit(ids[:-1], limit, None, f"example {i}: prompt {j} + document", [eos])
            # cut the document, never the prompt
            if doc_ids is None:
                doc_ids = encode_text(tokenizer, document)
            room = limit - len(prompt_ids[j]) - 1
            if room < 1:
                raise InputError(
                    f"example {i}: prompt {j} alone is {len(prompt_ids[j])} tokens, over the limit {limit}"
                )
            kept = doc_ids[:room] if truncate == "right" else doc_ids[len(doc_ids) - room :]
            plan.truncations.append(Truncation(i, j, truncate, len(ids), len(prompt_ids[j]) + len(kept) + 1))
            ids = prompt_ids[j] + kept + [eos]
        d = len(plan.docs)
        plan.docs.append(ids)
        plan.rows.append(Row(d, [start], limits[j]))
        plan.owner.append((i, j))


def parse_seq(text: str, prompts: list[str]) -> list[str]:
    """Split `prompt1: answer1; prompt2: answer2` back into one answer per prompt.

    A marker `prompt:` counts where it starts the text or follows a ';'. Every marker ends the
    answer before it, so answers may contain ';' or ':' themselves; markers may come in any order;
    the first occurrence of a prompt gives its answer; a prompt with no marker gets ""."""
    lowered = text.lower()
    markers = []  # (start, end, prompt index)
    for j, p in enumerate(prompts):
        key = f"{p.strip().lower()}:"
        k = lowered.find(key)
        while k >= 0:
            before = lowered[:k].rstrip()
            if not before or before.endswith(";"):
                markers.append((k, k + len(key), j))
            k = lowered.find(key, k + 1)
    markers.sort()
    answers: list[str | None] = [None] * len(prompts)
    for n, (_, end, j) in enumerate(markers):
        if answers[j] is not None:
            continue
        stop = markers[n + 1][0] if n + 1 < len(markers) else len(text)
        answers[j] = text[end:stop].strip().removesuffix(";").rstrip()
    return [a or "" for a in answers]


def format_seq(prompts: list[str], answers: list[str], omit: str | None = None) -> str:
    """The seq layout's target text (used for training and by tests). Pairs whose answer is
    `omit` are left out (`parse_seq` gives "" for them)."""
    return SEQ_SEPARATOR.join(f"{p}: {a}" for p, a in zip(prompts, answers) if omit is None or a != omit)


def collect(plan: Plan, tokens: list[list[int]], tokenizer) -> list[list[str]]:
    """Generated tokens per row -> answers per example, in prompt order."""
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    out = [[""] * len(p) for p in plan.prompts]
    for (i, j), text in zip(plan.owner, texts):
        if j < 0:
            out[i] = parse_seq(text, plan.prompts[i])
        else:
            out[i][j] = text.strip()
    return out


# -- training rows ----------------------------------------------------------------------------


@dataclass
class TrainItem:
    """One example as training rows. Each decoder row is `prefix + target`; the loss covers the
    target tokens (and the EOS that ends them), never the prefix (decoder start + prompt)."""

    example: int
    enc: list[list[int]]  # encoder rows: pid/seq one, pie one per subtask
    rows: list[tuple[int, list[int], list[int]]]  # (encoder row, prefix, target + EOS); seq: one row
    values: list[str]  # the target text of each row, for down-sampling a dominant value
    truncated: bool = False
    # the value each row's prompt carries (`question = value`), for down-sampling by row kind
    carried: list[str | None] = field(default_factory=list)
    # `--carried-noise`: row j -> the index of a row of its own, after the real ones, that
    # carries `none` in its prompt and keeps j's target (j's value is in the document)
    noisy: dict[int, int] = field(default_factory=dict)

    @property
    def real_rows(self) -> int:
        return len(self.rows) - len(self.noisy)


# A prompt may carry a value after this separator (`hotel area = north`: multiwoz-slot-state
# writes each slot's previous value there); `--downsample @unchanged:P` keeps a fraction P of
# the rows whose target repeats it.
CARRIED_SEPARATOR = " = "
UNCHANGED_ROWS = "@unchanged"  # the `--downsample` key of that row kind


def carried_value(prompt: str) -> str | None:
    """The value written after the prompt's first ` = `, or None when it has none."""
    head, sep, value = prompt.partition(CARRIED_SEPARATOR)
    return value if sep and head.strip() else None


NOTHING_CARRIED = "none"


def noisy_prompts(document: str, prompts: list[str], targets: list[str]) -> dict[int, str]:
    """For `--carried-noise`: prompt j -> the same prompt carrying `none`, for each prompt that
    carries a value other than `none`, that its target repeats, and that the document mentions
    (a whole-word match, any case): a value a chained model that had missed it could still read."""
    out = {}
    for j, (prompt, target) in enumerate(zip(prompts, targets)):
        value = carried_value(prompt)
        if value is None or value.strip().lower() in ("", NOTHING_CARRIED):
            continue
        if value.strip().lower() != target.strip().lower():
            continue
        if re.search(rf"(?<!\w){re.escape(value.strip())}(?!\w)", document, re.IGNORECASE):
            out[j] = prompt.partition(CARRIED_SEPARATOR)[0] + CARRIED_SEPARATOR + NOTHING_CARRIED
    return out


class TrainTokenizer:
    """Tokenizes training examples for a layout, caching prompts and targets (a task's 30 slot
    prompts and its frequent answers such as "none" are tokenized once, not once per example)."""

    def __init__(
        self,
        tokenizer,
        layout: str,
        max_input_length: int,
        decoder_start_token_id: int,
        truncate: str | None = None,
        seq_instruction: str | None = None,
        seq_omit: str | None = None,
        carried_noise: bool = False,
    ):
        self.tok = tokenizer
        self.carried_noise = carried_noise
        self.layout = check_layout(layout)
        self.limit = max_input_length
        self.start = decoder_start_token_id
        self.truncate = truncate
        self.seq_instruction = seq_instruction
        self.seq_omit = seq_omit
        self.eos = tokenizer.eos_token_id
        self.control = control_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as generation tokenizes it (`encode_text`), uncached."""
        return encode_text(self.tok, text, self.control)

    def ids(self, text: str) -> list[int]:
        got = self._cache.get(text)
        if got is None:
            got = self.encode(text)
            if len(self._cache) < 200_000:
                self._cache[text] = got
        return got

    def target_tokens(self, prompts: list[str], targets: list[str]) -> list[int]:
        """Target tokens with EOS, per row of the layout (seq: one row holding every answer)."""
        if self.layout == "seq":
            return [len(self.encode(format_seq(prompts, targets, self.seq_omit))) + 1]
        return [len(self.ids(t)) + 1 for t in targets]

    def item(self, i: int, document: str, prompts: list[str], targets: list[str]) -> TrainItem:
        if self.layout == "seq":
            text = document if not self.seq_instruction else f"{self.seq_instruction} {document}"
            ids, cut = fit(
                self.encode(text),
                self.limit,
                self.truncate,
                f"example {i}: document",
                [self.eos],
            )
            text = format_seq(prompts, targets, self.seq_omit)
            target = self.encode(text) + [self.eos]
            return TrainItem(i, [ids], [(0, [self.start], target)], [text], cut)
        targets_ids = [self.ids(t) + [self.eos] for t in targets]
        noisy = noisy_prompts(document, prompts, targets) if self.carried_noise else {}
        variants = list(noisy)  # the real rows that have a noisy variant, in order
        noisy_index = {j: len(prompts) + k for k, j in enumerate(variants)}
        carried = [carried_value(p) for p in prompts] + [NOTHING_CARRIED] * len(variants)
        values = list(targets) + [targets[j] for j in variants]
        if self.layout == "pid":
            ids, cut = fit(
                self.encode(document),
                self.limit,
                self.truncate,
                f"example {i}: document",
                [self.eos],
            )
            rows = [(0, [self.start] + self.ids(p), t) for p, t in zip(prompts, targets_ids)]
            rows += [(0, [self.start] + self.ids(noisy[j]), targets_ids[j]) for j in variants]
            return TrainItem(i, [ids], rows, values, cut, carried, noisy_index)
        plan = Plan("pie", [], [], [], [])
        _pie(
            plan,
            self.tok,
            i,
            document,
            prompts + [noisy[j] for j in variants],  # pie: a noisy prompt is an encoder row of its own
            [self.ids(p) for p in prompts] + [self.ids(noisy[j]) for j in variants],
            [1] * (len(prompts) + len(variants)),
            self.limit,
            self.start,
            self.truncate,
            self.eos,
        )
        rows = [(j, [self.start], t) for j, t in enumerate(targets_ids + [targets_ids[j] for j in variants])]
        return TrainItem(i, plan.docs, rows, values, bool(plan.truncations), carried, noisy_index)
