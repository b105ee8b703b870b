"""A request body becomes a batcher `Job`, or a `ServiceError` that names what is wrong.

`parse_request` reads the body as strict UTF-8 JSON into a `GenerateRequest` (422 invalid_json
for bytes that are not UTF-8, malformed or too deeply nested JSON; 422 invalid_request, with
pydantic's errors rewritten as one clause per field, for wrong types or unknown fields).
`build_job` checks the request against the service's limits in a fixed order (its text, the
prompt count and each prompt, the budgets, the beams, each prompt's tokens, then the document's
tokens as the layout builds its rows) and tokenizes it exactly as `Model.generate` would, so the
batcher's answer equals `Model.generate`'s. The first limit broken is the one named (413
too_large, 422 limit_exceeded or invalid_request). A decoder-only model's rows are causal.py's.

They run on the service's tokenizer threads (app.py), off the event loop, and keep no state.
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from .. import layouts
from ..api import Model
from ..causal import CausalModel
from ..errors import InputError
from . import causal
from .batcher import Job
from .schema import GenerateRequest, ServiceError
from .settings import ServeSettings

_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_request(body: bytes) -> GenerateRequest:
    """The request body, strict UTF-8 JSON, as a GenerateRequest; a ServiceError naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServiceError(
            422, "invalid_json", f"body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ServiceError(422, "invalid_json", f"malformed JSON at character {e.pos}: {e.msg}") from None
    except RecursionError:
        raise ServiceError(422, "invalid_json", "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_request", "body: expected a JSON object (Content-Type: application/json)")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as e:
        raise ServiceError(422, "invalid_request", _validation_message(e.errors())) from None
    except RecursionError:  # a deep value under a known field
        raise ServiceError(422, "invalid_json", "JSON nested too deeply") from None


def _check_text(name: str, text: str) -> None:
    """A lone surrogate (a JSON escape like \\ud800 with no partner) is not text: refuse it by name."""
    m = _SURROGATE.search(text)
    if m is not None:
        raise ServiceError(
            422,
            "invalid_request",
            f"{name} holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()}: not valid Unicode text",
        )


def build_job(model: Model, settings: ServeSettings, req: GenerateRequest) -> Job:
    """Check a request against the limits and tokenize it as `Model.generate` would."""
    budgets = _check_request(model.tokenizer, settings, req)
    try:
        if isinstance(model, CausalModel):  # decoder-only: its rows and limits are serving/causal.py's
            return causal.build_job(model, settings, req, budgets)
        # no cut here: a document above the limit is refused below, with the service's limit named
        plan = layouts.build(
            model.tokenizer,
            [(req.document, req.prompts)],
            req.layout,
            [budgets],
            1 << 30,
            model.config.decoder_start_token_id,
        )
    except causal.DocumentTooLong as e:
        raise ServiceError(413, "too_large", str(e), "max_document_tokens") from e
    except InputError as e:
        raise ServiceError(422, "invalid_request", str(e)) from e
    for i, doc in enumerate(plan.docs):
        if len(doc) > settings.max_document_tokens:
            what = "document" if req.layout != "pie" else f"prompts[{i}] + document"
            raise ServiceError(
                413,
                "too_large",
                f"{what} is {len(doc)} tokens with EOS, above the limit max_document_tokens={settings.max_document_tokens}",
                "max_document_tokens",
            )
    return Job(plan, num_beams=req.num_beams)


def _check_request(tok, settings: ServeSettings, req: GenerateRequest) -> list[int]:
    """A request's text, prompt count and lengths, budgets and beams against the limits (a
    ServiceError naming the first one broken); returns its budget per prompt."""
    _check_text("document", req.document)
    for j, p in enumerate(req.prompts):
        _check_text(f"prompts[{j}]", p)
    if not req.document.strip():
        raise ServiceError(422, "invalid_request", "document is empty")
    if not req.prompts:
        raise ServiceError(422, "invalid_request", "prompts is empty: give at least one prompt")
    k = len(req.prompts)
    if k > settings.max_prompts:
        raise ServiceError(
            413, "too_large", f"{k} prompts, above the limit max_prompts={settings.max_prompts}", "max_prompts"
        )
    for j, p in enumerate(req.prompts):
        if not p.strip():
            raise ServiceError(422, "invalid_request", f"prompts[{j}] is empty or whitespace")
    budgets = _budgets(req.max_new_tokens, k, settings)
    if not 1 <= req.num_beams <= settings.max_num_beams:
        raise ServiceError(
            422,
            "limit_exceeded",
            f"num_beams={req.num_beams}: must be between 1 and the limit max_num_beams={settings.max_num_beams}",
            "max_num_beams",
        )
    for j, ids in enumerate(tok(req.prompts, add_special_tokens=False)["input_ids"]):
        if len(ids) > settings.max_prompt_tokens:
            raise ServiceError(
                413,
                "too_large",
                f"prompts[{j}] is {len(ids)} tokens, above the limit max_prompt_tokens={settings.max_prompt_tokens}",
                "max_prompt_tokens",
            )
    return budgets


def _budgets(value, k: int, settings: ServeSettings) -> list[int]:
    limit = settings.max_new_tokens_limit
    if value is None:
        return [settings.default_max_new_tokens] * k
    values = [value] * k if isinstance(value, int) else value
    name = "max_new_tokens" if isinstance(value, int) else "max_new_tokens[{}]"
    if len(values) != k:
        raise ServiceError(422, "invalid_request", f"{len(values)} max_new_tokens values for {k} prompts")
    for j, n in enumerate(values):
        if n < 1:
            raise ServiceError(422, "invalid_request", f"{name.format(j)}={n}: must be >= 1")
        if n > limit:
            raise ServiceError(
                422,
                "limit_exceeded",
                f"{name.format(j)}={n}: above the limit max_new_tokens_limit={limit}",
                "max_new_tokens_limit",
            )
    return values


def _field(loc) -> str:
    """("body", "prompts", 1) -> "prompts[1]"; pydantic's union branches ("int", "list[int]") dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "list[int]", "str"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _validation_message(errors) -> str:
    parts, seen = [], set()
    for e in errors:
        name = _field(e.get("loc", ()))
        if name in seen:
            continue  # a union field fails once per branch: report it once
        seen.add(name)
        if e.get("type") == "extra_forbidden":
            parts.append(f"{name}: unknown field")
        elif e.get("type") == "missing":
            parts.append(f"{name}: required")
        elif name == "max_new_tokens":
            parts.append("max_new_tokens: expected an integer or a list of integers")
        else:
            parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def job_from_body(model: Model, settings: ServeSettings, body: bytes) -> Job:
    """A request body as a checked, tokenized job (`parse_request`, then `build_job`)."""
    return build_job(model, settings, parse_request(body))
