"""The run folder: its config, its log, its checkpoints, and reading them back on resume.

    run_config.json           the resolved TrainConfig (`--resume` reads it)
    log.jsonl                 one JSON record a line: start/resume, train steps, evals, end
    checkpoint-N/             the model (or LoRA adapter), trainer_state.pt, rng-R.pt per process
    best/, final/             the model at the best evaluation and at the end (+ metrics.json)

Every folder is written under a temporary name and renamed into place, and files are
replaced atomically, so a kill at any moment leaves the previous version or the new one,
never half of one (`recover` tidies what a kill inside a save left behind).

Nothing in a run folder runs code when loaded: trainer_state.pt and rng-R.pt hold tensors and
plain containers only and are read with `torch.load(weights_only=True)` (RNG states are
tensors, Python's included), and the model is safetensors. A file that does not load that way,
a truncated or empty one, or a missing one makes its checkpoint unreadable: resume takes the
newest readable checkpoint, says which ones it passed over and why, and moves them aside
(`unreadable-checkpoint-N`) instead of deleting anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .. import checkpoint
from ..errors import InputError
from .config import TrainConfig

RUN_CONFIG = "run_config.json"
LOG = "log.jsonl"
STATE = "trainer_state.pt"
STATE_SUMMARY = "trainer_state.json"
STATE_KEYS = {"step": int, "epoch": int, "position": int, "processes": int, "optimizer": dict, "scheduler": dict}

T = TypeVar("T")


class UnreadableCheckpoint(InputError):
    """A checkpoint whose files are missing, truncated, or not in the safe format."""


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an older copy is moved aside first, then removed."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def recover(folder: Path) -> None:
    """Undo what a kill in the middle of a save left: temporary folders, a moved-aside folder."""
    for p in folder.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".old-*"):
        final = folder / p.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, final)


def load_run_config(folder: str | os.PathLike) -> TrainConfig:
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"--resume {folder}: no {RUN_CONFIG} there (not a pidec training folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--resume {folder}: {RUN_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"--resume {folder}: {RUN_CONFIG} does not hold a JSON object")
    return TrainConfig.from_dict(raw)


# -- RNG states as tensors -------------------------------------------------------------------


def rng_state() -> dict:
    """This process's random states, as tensors and numbers (loadable with weights_only=True)."""
    version, words, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_safe(path: Path) -> dict:
    """A dict of tensors and plain values, or UnreadableCheckpoint saying why not."""
    if not path.is_file():
        raise UnreadableCheckpoint(f"{path.name} is missing")
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(f"{path.name} is empty")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle of other objects, ...: never run, only refused
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(f"{path.name} does not load as tensors and plain values ({reason[:200]})") from None
    if not isinstance(value, dict):
        raise UnreadableCheckpoint(f"{path.name} holds a {type(value).__name__}, not a dict")
    return value


def read_state(folder: Path) -> dict:
    """A checkpoint's trainer state, checked, with every process's RNG state under "rng"."""
    state = load_safe(folder / STATE)
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise UnreadableCheckpoint(f"{STATE} has no valid {key!r}")
    if not (state.get("best") is None or isinstance(state["best"], dict)):
        raise UnreadableCheckpoint(f"{STATE} has no valid 'best'")
    state["rng"] = []
    for rank in range(state["processes"]):
        rng = load_safe(folder / f"rng-{rank}.pt")
        if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("python"), torch.Tensor):
            raise UnreadableCheckpoint(f"rng-{rank}.pt has no valid torch and python states")
        state["rng"].append(rng)
    return state


# -- the folder ------------------------------------------------------------------------------


class RunFolder:
    """One run's folder. Only the main process writes to it (the RNG files excepted)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def holds_a_run(self) -> bool:
        return self.path.exists() and (bool(self.checkpoints()) or (self.path / LOG).exists())

    def open(self, resume: bool) -> None:
        """Create the folder (a new run) or tidy it (resume). A folder that holds a run is
        only continued with resume=True."""
        if not resume and self.holds_a_run():
            raise InputError(f"--output {self.path} already holds a run; pass --resume {self.path} or another folder")
        self.path.mkdir(parents=True, exist_ok=True)
        recover(self.path)

    def save_config(self, cfg: TrainConfig) -> None:
        checkpoint.write_atomic(self.path / RUN_CONFIG, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (renamed into place), oldest first."""
        found = []
        for p in self.path.glob("checkpoint-*"):
            step = p.name.removeprefix("checkpoint-")
            if p.is_dir() and step.isdigit() and (p / STATE).is_file():
                found.append((int(step), p))
        return sorted(found)

    def begin_checkpoint(self, step: int) -> Path:
        tmp = self.path / f".tmp-checkpoint-{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish_checkpoint(self, tmp: Path, step: int, keep: int) -> None:
        """Rename a written checkpoint into place, then drop all but the `keep` newest."""
        os.rename(tmp, self.path / f"checkpoint-{step}")
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_readable(self, read: Callable[[Path], T]) -> tuple[T | None, Path | None, list[str]]:
        """`read` of the newest checkpoint it succeeds on (None if there is no checkpoint), its
        folder, and one line per newer checkpoint it failed on. Raises when every one fails."""
        passed: list[str] = []
        for _, folder in reversed(self.checkpoints()):
            try:
                return read(folder), folder, passed
            except UnreadableCheckpoint as e:
                passed.append(f"{folder.name}: {e}")
        if passed:
            raise InputError(f"--resume {self.path}: no readable checkpoint ({'; '.join(passed)})")
        return None, None, passed

    def set_aside(self, names: list[str]) -> None:
        """Rename unreadable checkpoints out of the way (kept for inspection, never deleted)."""
        for name in names:
            folder = self.path / name
            if folder.exists():
                os.rename(folder, self.path / f"unreadable-{name}")

    def save_named(self, name: str, save_model: Callable[[Path], None], metrics: dict | None = None) -> None:
        """best/ or final/: the model, and the metrics that chose it."""
        tmp = self.path / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(tmp)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        replace_dir(tmp, self.path / name)

    # -- log -------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        with open(self.path / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def trim_log(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint: those steps run again."""
        path = self.path / LOG
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        checkpoint.write_atomic(path, "".join(line + "\n" for line in kept))
