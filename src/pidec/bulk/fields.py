"""What every record is asked: a fields file (the user's schema), fixed prompts, or the record's own.

A fields file is JSON or YAML holding a list (or `{"fields": [...]}`) of

    {"name": "hotel_area", "prompt": "hotel area", "max_new_tokens": 8, "num_beams": 1}

`name` keys the answer in the output, `prompt` is what the decoder row starts with,
`max_new_tokens` and `num_beams` are optional (the run's defaults stand in). A bad fields file
(not a list, a duplicate or missing name, a missing or blank prompt, a budget that is not a
positive integer) stops the run before anything is read, naming the field.

`Questions` is the one value the rest of the run sees: either fixed fields that apply to every
record (from a fields file, or `--prompt`s named by position), or "take the prompts from the
record" (a `prompts` list, or `subtasks` as in the training JSONL).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError


class FieldsError(InputError):
    """A fields file or a --prompt that cannot be used: names the file and the field."""


@dataclass(frozen=True)
class Field:
    name: str
    prompt: str
    max_new_tokens: int | None = None  # None: the run's --max-new-tokens
    num_beams: int | None = None  # None: the run's --num-beams


@dataclass(frozen=True)
class Questions:
    """fields: asked of every record (named: answers keyed by name; else a list in prompt order);
    None: each record brings its own prompts."""

    fields: tuple[Field, ...] | None = None
    named: bool = False

    @property
    def from_record(self) -> bool:
        return self.fields is None

    def names(self) -> list[str] | None:
        return [f.name for f in self.fields] if self.named and self.fields else None

    def to_dict(self) -> dict:
        """What a resumed run compares with the run that wrote the output."""
        if self.fields is None:
            return {"from_record": True}
        return {"named": self.named, "fields": [asdict(f) for f in self.fields]}


def _positive(value, where: str, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldsError(f"{where}: {what} must be an integer >= 1, got {value!r}")
    return value


def parse_fields(data, source: str) -> tuple[Field, ...]:
    """A decoded fields file -> its fields; every error names `source` and the field."""
    if isinstance(data, dict) and "fields" in data:
        data = data["fields"]
    if not isinstance(data, list) or not data:
        raise FieldsError(f"{source}: expected a non-empty list of fields ({{name, prompt, max_new_tokens}})")
    fields, seen = [], {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise FieldsError(f"{source}: field {i} must be an object with name and prompt, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FieldsError(f"{source}: field {i} has no name (a non-empty string)")
        where = f"{source}: field {name!r}"
        unknown = set(item) - {"name", "prompt", "max_new_tokens", "num_beams"}
        if unknown:
            raise FieldsError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                "(expected name, prompt, max_new_tokens, num_beams)"
            )
        if name in seen:
            raise FieldsError(f"{where}: duplicate name (fields {seen[name]} and {i})")
        seen[name] = i
        prompt = item.get("prompt")
        if prompt is None:
            raise FieldsError(f"{where}: missing prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FieldsError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
        fields.append(
            Field(
                name,
                prompt,
                _positive(item.get("max_new_tokens"), where, "max_new_tokens"),
                _positive(item.get("num_beams"), where, "num_beams"),
            )
        )
    return tuple(fields)


def read_fields(path: str | Path) -> tuple[Field, ...]:
    """Read a fields file: .yaml/.yml through PyYAML, anything else as JSON."""
    path = Path(path)
    if not path.is_file():
        raise FieldsError(f"fields file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FieldsError(f"fields file {path} is not UTF-8 text ({e.reason})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise FieldsError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FieldsError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return parse_fields(data, str(path))


def questions(fields_file: str | Path | None = None, prompts: list[str] | None = None, fields=None) -> Questions:
    """The run's questions from exactly one of: a fields file, a list of fields (dicts or
    `Field`s), fixed prompts, or nothing (each record brings its own)."""
    given = [x for x in (fields_file, fields, prompts) if x]
    if len(given) > 1:
        raise FieldsError("give one of a fields file, fields, or prompts, not several")
    if fields_file:
        return Questions(read_fields(fields_file), named=True)
    if fields:
        items = [asdict(f) if isinstance(f, Field) else f for f in fields]
        return Questions(parse_fields(items, "fields"), named=True)
    if prompts:
        out = []
        for j, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise FieldsError(f"prompt {j} is empty or whitespace")
            out.append(Field(str(j), p))
        return Questions(tuple(out), named=False)
    return Questions(None)
