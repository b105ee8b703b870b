"""The service's wire format: the body of POST /v1/generate (`GenerateRequest`), its answer
(`GenerateResponse` with `Usage` and `Timings`), and the one shape of every other answer,
`{"error": {"kind", "message", "limit"?}}` (`ErrorResponse`, made by `error_response`).

`ServiceError` is a refusal anywhere in the service: it carries its status, kind, message, the
limit it names (if any) and its headers, and answers itself in the error shape. The kinds and
statuses are listed in app.py's docstring; `ERROR_RESPONSES` documents them in the OpenAPI schema.
The pydantic models only describe and validate; checking against the service's limits is
requests.py's.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document: StrictStr = Field(description="the shared input, encoded once")
    prompts: list[StrictStr] = Field(description="one subtask prompt per output")
    max_new_tokens: StrictInt | list[StrictInt] | None = Field(
        None, description="one budget for every prompt, or one per prompt; default: the service's"
    )
    num_beams: StrictInt = Field(1, description="1: greedy (continuous batching); more: beam search")
    layout: Literal["pid", "pie", "seq"] = Field("pid", description="how the prompts meet the model")


class Usage(BaseModel):
    document_tokens: int
    prompt_tokens: int
    output_tokens: int


class Timings(BaseModel):
    queue_ms: float = Field(description="from arrival until the decoding thread took the request")
    encode_ms: float = Field(description="encoding its document")
    decode_ms: float = Field(description="from its encoding until its last row ended (steps shared with others)")
    total_ms: float = Field(description="from arrival to answer")


class GenerateResponse(BaseModel):
    outputs: list[str]
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    kind: str
    message: str
    limit: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "missing or wrong bearer token"),
        (408, "the body did not arrive within body_timeout_s"),
        (413, "body, document, prompt count or prompt length above a limit"),
        (415, "the body is not Content-Type: application/json"),
        (422, "malformed JSON, wrong types, empty document or prompts, a parameter above its limit"),
        (429, "queue full; retry after Retry-After seconds"),
        (500, "the batch this request was in failed"),
        (503, "shutting down, or too many connections open"),
        (504, "not answered within the request timeout"),
    )
}


class ServiceError(Exception):
    """A refusal: answered as `{"error": {"kind", "message", "limit"?}}` with `status`.
    close: the connection is closed after the answer (the body was not read to its end)."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        limit: str | None = None,
        headers: dict | None = None,
        close: bool = False,
    ):
        super().__init__(message)
        self.status, self.kind, self.message, self.limit = status, kind, message, limit
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"

    def response(self) -> JSONResponse:
        return error_response(self.status, self.kind, self.message, self.limit, self.headers)


def error_response(status: int, kind: str, message: str, limit: str | None = None, headers=None) -> JSONResponse:
    body = {"kind": kind, "message": message}
    if limit is not None:
        body["limit"] = limit
    return JSONResponse({"error": body}, status_code=status, headers=headers)
