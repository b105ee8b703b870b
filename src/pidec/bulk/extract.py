"""One record -> a job -> its output record; jobs grouped into token-budgeted batches and decoded.

The engines (the single-machine runner, its worker processes, the Ray actors) all go through
here, so a record gets the same answer whichever runs it:

- `prepare` turns a window of raw records into `Job`s (id, document, prompts, token budgets,
  the document's token count) or, for a record that cannot be processed, its error record. The
  document is tokenized here once to know its length: a document over the model's input limit
  without a truncation side is an error record, not a failed batch.
- `batches` sorts a window's jobs by document length and cuts them with the shared token-budget
  splitter (`pidec.generate.budget_ranges`, as the service's batcher does): a batch holds at
  most `batch_tokens` padded document tokens, so little of it is padding.
- `decode` answers one batch with `Model.generate_batch`, once per distinct `num_beams` among
  the fields. If the batch fails as a whole, each job is decoded alone, so one bad record
  costs one error record, never its neighbours.
- A decoder-only model (`CausalModel`: Llama, Qwen, Mistral) answers a batch as one plan of its
  rows (its template, each record's shared prefix) decoded together, greedy only. Its rows are
  document + prompt, so a document is too long when its longest row is over the model's limit:
  `prepare` refuses a document over the limit by itself, the model the rest (as
  document_too_long). A record's usage is what `CausalModel.generate` reports for it alone
  (document_tokens: the rows' shared prefix), and `truncated_from` is its longest row's tokens
  before the document was cut.

Output records (what the writers store, one per input record):

    {"id": "...", "answers": {"name": "..."} | ["...", ...], "usage": {"document_tokens": n,
     "prompt_tokens": n, "output_tokens": n}}                       answered
    {"id": "..." | null, "error": {"kind": "...", "message": "..."}}   could not be processed

with `"truncated_from": n` (the document's tokens before cutting) on an answered record whose
document was cut by `--truncate`. Ids are written as strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..causal.api import CausalModel, check_beams, example_usage
from ..causal.layouts import RowTooLong
from ..errors import InputError
from ..generate import budget_ranges
from ..layouts import check_layout
from .fields import Questions
from .readers import RawRecord

ERROR_KINDS = (
    "malformed_line",  # a JSONL line that is not a JSON object, or a CSV row with extra values
    "missing_id",
    "missing_document",
    "empty_document",
    "document_too_long",  # over the model's input limit and no --truncate
    "blank_prompt",  # a record's own prompt that is empty or whitespace
    "no_prompts",  # a record without prompts when the run takes them from the record
    "input_error",  # the model refused the record for another reason (the message says which)
    "decode_failed",  # decoding raised: a bug or the machine (out of memory); the message says which
)


@dataclass(frozen=True)
class Options:
    """How every record is decoded; `to_dict` is what a resumed run must match."""

    layout: str = "pid"
    num_beams: int = 1
    max_new_tokens: int = 32
    truncate: str | None = None
    id_field: str = "id"
    document_field: str = "document"
    batch_tokens: int = 8192  # padded document tokens decoded together

    def __post_init__(self):
        check_layout(self.layout)
        for name in ("num_beams", "max_new_tokens", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.truncate not in (None, "left", "right"):
            raise InputError(f"truncate {self.truncate!r}: expected left or right")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "batch_tokens"}


@dataclass
class Job:
    index: int  # position in its window
    id: str
    document: str
    prompts: list[str]
    budgets: list[int]
    beams: list[int]
    names: list[str] | None  # field names (answers keyed by them), or None (a list)
    doc_tokens: int  # with EOS, after truncation
    prompt_tokens: int
    truncated_from: int | None = None


class PromptCounter:
    """Tokens of a list of prompts, remembered for the fixed fields asked of every record."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[tuple[str, ...], int] = {}

    def __call__(self, prompts: list[str]) -> int:
        key = tuple(prompts)
        if key not in self.cache:
            n = sum(len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"])
            if len(self.cache) < 64:
                self.cache[key] = n
            return n
        return self.cache[key]


def error_record(record_id, kind: str, message: str) -> dict:
    return {"id": None if record_id is None else str(record_id), "error": {"kind": kind, "message": message}}


def _record_prompts(data: dict, where: str) -> tuple[list[str], None] | tuple[None, dict]:
    raw = data.get("prompts")
    if raw is None and isinstance(data.get("subtasks"), list):
        raw = [s.get("prompt") if isinstance(s, dict) else s for s in data["subtasks"]]
    if raw is None:
        return None, (
            "no_prompts",
            f"{where}: no prompts (give the record a 'prompts' list or 'subtasks', or give "
            "the run --fields or --prompt)",
        )
    if isinstance(raw, str):
        return None, ("no_prompts", f"{where}: 'prompts' must be a list of strings, got one string")
    raw = list(raw)
    if not raw:
        return None, ("no_prompts", f"{where}: empty prompt list")
    for j, p in enumerate(raw):
        if not isinstance(p, str) or not p.strip():
            return None, ("blank_prompt", f"{where}: prompt {j} is empty or not a string ({p!r})")
    return raw, None


def _checked_record(raw: RawRecord, questions: Questions, options: Options) -> tuple[object, str, list[str]] | dict:
    """A raw record's (id, document, prompts), or its error record when one of them is missing or
    unusable. Nothing is tokenized here."""
    if raw.error is not None:
        return error_record(None, *raw.error)
    data = raw.data
    record_id = data.get(options.id_field)
    if record_id is None or (isinstance(record_id, str) and not record_id.strip()):
        return error_record(None, "missing_id", f"{raw.where}: no {options.id_field!r} (the record's id)")
    where = f"{raw.where}: id {record_id!s}"
    document = data.get(options.document_field)
    if document is None:
        return error_record(record_id, "missing_document", f"{where}: no {options.document_field!r} (the document)")
    if not isinstance(document, str):
        message = f"{where}: {options.document_field!r} is {type(document).__name__}, expected text"
        return error_record(record_id, "missing_document", message)
    if not document.strip():
        return error_record(record_id, "empty_document", f"{where}: {options.document_field!r} is empty")
    if not questions.from_record:
        return record_id, document, [f.prompt for f in questions.fields]
    prompts, problem = _record_prompts(data, where)
    if problem is not None:
        return error_record(record_id, *problem)
    return record_id, document, prompts


def _job(
    slot: int,
    raw: RawRecord,
    checked: tuple[object, str, list[str]],
    doc_tokens: int,
    questions: Questions,
    options: Options,
    max_input_length: int,
    count_prompts: PromptCounter,
) -> Job | dict:
    """The Job of one checked record whose document is `doc_tokens` long (with EOS), or its
    document_too_long error record when that is over the limit and the run does not truncate."""
    record_id, document, prompts = checked
    truncated_from = None
    if doc_tokens > max_input_length:
        if options.truncate is None:
            message = (
                f"{raw.where}: id {record_id!s}: document is {doc_tokens} tokens, over the model's limit of "
                f"{max_input_length} (pass --truncate left|right to cut it)"
            )
            return error_record(record_id, "document_too_long", message)
        truncated_from, doc_tokens = doc_tokens, max_input_length
    if questions.from_record:
        budgets, beams = [options.max_new_tokens] * len(prompts), [options.num_beams] * len(prompts)
    else:
        budgets = [f.max_new_tokens or options.max_new_tokens for f in questions.fields]
        beams = [f.num_beams or options.num_beams for f in questions.fields]
    return Job(
        slot,
        str(record_id),
        document,
        prompts,
        budgets,
        beams,
        questions.names(),
        doc_tokens,
        count_prompts(prompts),
        truncated_from,
    )


def prepare(
    raws: list[RawRecord],
    questions: Questions,
    options: Options,
    tokenizer,
    max_input_length: int,
    count_prompts: PromptCounter | None = None,
) -> list[Job | dict]:
    """One entry per raw record, in order: a Job, or the error record of a record that cannot
    be processed. Documents are tokenized together (one tokenizer call per window)."""
    count_prompts = count_prompts or PromptCounter(tokenizer)
    out: list[Job | dict] = [_checked_record(raw, questions, options) for raw in raws]
    pending = [slot for slot, entry in enumerate(out) if isinstance(entry, tuple)]
    if not pending:
        return out
    documents = [out[slot][1] for slot in pending]
    lengths = [len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]]
    for slot, n in zip(pending, lengths):
        out[slot] = _job(slot, raws[slot], out[slot], n, questions, options, max_input_length, count_prompts)
    return out


def batches(jobs: list[Job], batch_tokens: int) -> list[list[Job]]:
    """Jobs sorted by document length (ties by window position), cut into token-budgeted batches."""
    ordered = sorted(jobs, key=lambda j: (j.doc_tokens, j.index))
    return [ordered[lo:hi] for lo, hi in budget_ranges([j.doc_tokens for j in ordered], batch_tokens)]


def _answered(job: Job, answers: list[str], usage: dict, truncated_from: int | None) -> dict:
    record = {
        "id": job.id,
        "answers": dict(zip(job.names, answers)) if job.names is not None else list(answers),
        "usage": usage,
    }
    if truncated_from is not None:
        record["truncated_from"] = truncated_from
    return record


def _decode_together(model, jobs: list[Job], options: Options) -> list[dict]:
    answers = [[None] * len(j.prompts) for j in jobs]
    tokens = [0] * len(jobs)
    for beams in sorted({b for j in jobs for b in j.beams}):
        members, examples, budgets, slots = [], [], [], []
        for i, job in enumerate(jobs):
            picked = [k for k, b in enumerate(job.beams) if b == beams]
            if picked:
                members.append(i)
                slots.append(picked)
                examples.append((job.document, [job.prompts[k] for k in picked]))
                budgets.append([job.budgets[k] for k in picked])
        result = model.generate_batch(
            examples,
            max_new_tokens=budgets,
            num_beams=beams,
            layout=options.layout,
            truncate=options.truncate,
            return_details=True,
        )
        for i, picked, outs, n in zip(members, slots, result.outputs, result.example_output_tokens):
            for k, text in zip(picked, outs):
                answers[i][k] = text
            tokens[i] += n
    return [
        _answered(
            job,
            a,
            {"document_tokens": job.doc_tokens, "prompt_tokens": job.prompt_tokens, "output_tokens": n},
            job.truncated_from,
        )
        for job, a, n in zip(jobs, answers, tokens)
    ]


def _decode_causal(model: CausalModel, jobs: list[Job], options: Options) -> list[dict]:
    """A decoder-only model's batch: every job's rows in one plan, decoded together."""
    for beams in {b for j in jobs for b in j.beams}:
        check_beams(beams)
    plan = model.plan(
        [(j.document, j.prompts) for j in jobs], [j.budgets for j in jobs], options.layout, options.truncate
    )
    tokens, _ = model.decode_plan(plan)
    cut = {t.example: t.original_tokens for t in plan.truncations}
    return [
        _answered(job, answers, usage, cut.get(i))
        for i, (job, answers, usage) in enumerate(zip(jobs, model.answers(plan, tokens), example_usage(plan, tokens)))
    ]


def decode(model, jobs: list[Job], options: Options) -> list[dict]:
    """Output records for one batch, in the batch's order; never raises for a record's sake."""
    try:
        if isinstance(model, CausalModel):
            return _decode_causal(model, jobs, options)
        return _decode_together(model, jobs, options)
    except Exception as e:  # isolate the record that failed: decode each alone
        if len(jobs) == 1:
            kind = "input_error" if isinstance(e, InputError) else "decode_failed"
            kind = "document_too_long" if isinstance(e, RowTooLong) else kind
            return [
                error_record(
                    jobs[0].id,
                    kind,
                    f"id {jobs[0].id}: {type(e).__name__}: {e}" if kind == "decode_failed" else f"id {jobs[0].id}: {e}",
                )
            ]
        return [r for job in jobs for r in decode(model, [job], options)]
