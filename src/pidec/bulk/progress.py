"""The progress file: which input shards and offsets are done, so that a killed run resumes.

One small JSON file beside the output (`OUTPUT/_progress.json`, or `OUTPUT.progress.json` for a
single output file), replaced atomically (written to a temporary name, fsynced, renamed) after
each window of records is written and fsynced:

    {"version": 1, "fingerprint": {...}, "counts": {...},
     "shards": {"in/a.jsonl": {"output": "out/a.jsonl", "done": 1536, "bytes": 402113,
                                "finished": false, "complete": false}}}

`done` records of the shard are answered (or counted as errors) and their output is the first
`bytes` bytes of the staging file. A run killed at any moment leaves either the old or the new
file, never half of one; what the staging file holds past `bytes` is cut on resume. `finished`
is set before the staging file becomes the final output and `complete` after, so a run killed
between the two finishes the rename on resume.

The fingerprint is what the output depends on: the model (config.json's hash, each weight
file's size and a hash of its first and last MiB: cheap for multi-GB checkpoints, blind to an
edit that keeps both ends and the size), the fields or prompts, the decoding options, the
input shards and the output format. A resumed run whose fingerprint differs refuses, naming
what changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from ..errors import InputError

VERSION = 1
HASHED_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
WHAT_CHANGED = {
    "model": "the model changed",
    "questions": "the fields or prompts changed",
    "options": "the decoding options changed",
    "runtime": "the dtype or quantization changed",
    "shards": "the input files changed",
    "output_format": "the output format changed",
    "limit": "--limit changed",
}


class ResumeError(InputError):
    """A run that cannot resume into this output: says why and what to do."""


def model_identity(folder: str | Path) -> dict:
    """config.json's sha256 and each weight file's size and head/tail sha256 (see the module doc)."""
    folder = Path(folder)
    ident: dict = {}
    for name in ("config.json", "adapter_config.json"):
        p = folder / name
        if p.is_file():
            ident[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.iterdir()):
        if p.suffix in WEIGHT_SUFFIXES and p.is_file():
            h = hashlib.sha256()
            size = p.stat().st_size
            with p.open("rb") as f:
                h.update(f.read(HASHED_BYTES))
                if size > HASHED_BYTES:
                    f.seek(max(HASHED_BYTES, size - HASHED_BYTES))
                    h.update(f.read(HASHED_BYTES))
            ident[p.name] = f"{size}:{h.hexdigest()}"
    return ident


def progress_path(output: str | Path, single_file: bool) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".progress.json") if single_file else output / "_progress.json"


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        what = WHAT_CHANGED.get(key, f"{key} changed")
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            what += " (" + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4]) + ")"
        out.append(what)
    return out


def empty_counts() -> dict:
    return {"records": 0, "answered": 0, "errors": {}, "truncated": 0, "document_tokens": 0, "output_tokens": 0}


def add_counts(counts: dict, records: list[dict]) -> None:
    errors = Counter(counts["errors"])
    for r in records:
        counts["records"] += 1
        if "error" in r:
            errors[r["error"]["kind"]] += 1
        else:
            counts["answered"] += 1
            counts["document_tokens"] += r["usage"]["document_tokens"]
            counts["output_tokens"] += r["usage"]["output_tokens"]
            counts["truncated"] += "truncated_from" in r
    counts["errors"] = dict(sorted(errors.items()))


class Progress:
    """The progress file's state in memory; `save` replaces the file atomically."""

    def __init__(self, path: Path, state: dict, resumed: bool):
        self.path, self.state, self.resumed = path, state, resumed

    @classmethod
    def open(
        cls,
        path: Path,
        fingerprint: dict,
        targets: dict[str, Path],
        resume: bool = False,
        overwrite: bool = False,
    ) -> Progress:
        """The progress of this output: resumed when its fingerprint matches, new when there is
        none. Refuses (ResumeError) an output written by another run or by no pidec run."""
        fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from the file
        outputs = [p for p in targets.values()]
        if overwrite:
            for p in outputs:
                for q in (p, p.with_name(p.name + ".partial"), p.with_name(p.name + ".tmp")):
                    q.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ResumeError(f"{path}: unreadable progress file ({e}); start again with --overwrite") from None
            if state.get("version") != VERSION:
                raise ResumeError(f"{path}: progress file version {state.get('version')!r}, expected {VERSION}")
            changes = _differences(state.get("fingerprint", {}), fingerprint)
            if changes:
                raise ResumeError(
                    f"refusing to resume into {path.parent}: {'; '.join(changes)} since the run that wrote it. "
                    "Write to a new --output, or pass --overwrite to start this output again"
                )
            return cls(path, state, resumed=True)
        if resume:
            raise ResumeError(f"--resume: no progress file {path} (nothing to resume)")
        existing = [str(p) for p in outputs if p.exists() or p.with_name(p.name + ".partial").exists()]
        if existing:
            raise ResumeError(
                f"{existing[0]} exists and no progress file says which run wrote it: "
                "write to a new --output, or pass --overwrite to replace it"
            )
        shards = {
            key: {"output": str(out), "done": 0, "bytes": 0, "finished": False, "complete": False}
            for key, out in targets.items()
        }
        state = {"version": VERSION, "fingerprint": fingerprint, "counts": empty_counts(), "shards": shards}
        progress = cls(path, state, resumed=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        progress.save()
        return progress

    def shard(self, key: str) -> dict:
        return self.state["shards"][key]

    @property
    def counts(self) -> dict:
        return self.state["counts"]

    def commit(self, key: str, done: int, committed_bytes: int, records: list[dict]) -> None:
        s = self.shard(key)
        s["done"], s["bytes"] = done, committed_bytes
        add_counts(self.state["counts"], records)
        self.save()

    def mark(self, key: str, **flags) -> None:
        self.shard(key).update(flags)
        self.save()

    def snapshot(self) -> dict:
        return copy.deepcopy(self.state)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
