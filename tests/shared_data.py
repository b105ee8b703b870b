"""Where the tests find ../shared (the real T5 vocabulary). In CI (CI=true) a missing folder is a
failure; elsewhere the tests that need it are skipped with the reason."""

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("PIDEC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
T5_TOKENIZER = SHARED / "tokenizers" / "t5"


def require(path: Path) -> Path:
    if path.exists():
        return path
    message = f"{path} is missing (the repository expects ../shared beside it; set PIDEC_SHARED to move it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
