"""Compare two `pidec eval --out` runs of the same task and split: the share of subtasks whose
answers are identical, and how far each metric moved.

    pidec demo --output demo                                   # or any model trained by pidec train
    pidec eval --task jsonl --model demo/run/final --data demo/test.jsonl --split test --out a
    pidec eval --task jsonl --model demo/run/final --data demo/test.jsonl --split test --out b --quantize int8
    python scripts/agreement.py a b

(The folders hold one *.predictions.jsonl and one *.metrics.json each.)"""

import json
import sys
from pathlib import Path


def one(folder: str, suffix: str) -> Path:
    found = sorted(Path(folder).glob(f"*{suffix}"))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one *{suffix}, found {len(found)}")
    return found[0]


def main(a: str, b: str) -> None:
    rows_a = [json.loads(line) for line in one(a, ".predictions.jsonl").read_text().splitlines() if line.strip()]
    rows_b = [json.loads(line) for line in one(b, ".predictions.jsonl").read_text().splitlines() if line.strip()]
    if [r["id"] for r in rows_a] != [r["id"] for r in rows_b]:
        raise SystemExit("the two runs did not predict the same examples in the same order")
    same = total = 0
    for ra, rb in zip(rows_a, rows_b):
        if len(ra["predictions"]) != len(rb["predictions"]):
            raise SystemExit(f"example {ra['id']}: {len(ra['predictions'])} against {len(rb['predictions'])} answers")
        for pa, pb in zip(ra["predictions"], rb["predictions"]):
            same += pa == pb
            total += 1
    print(f"identical answers: {same} / {total} subtasks = {100 * same / total:.2f}%")
    ma = json.loads(one(a, ".metrics.json").read_text())["metrics"]
    mb = json.loads(one(b, ".metrics.json").read_text())["metrics"]
    for name, value in ma.items():
        if isinstance(value, float) and isinstance(mb.get(name), float):
            print(f"{name}: {value:.3f} -> {mb[name]:.3f} ({mb[name] - value:+.3f})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
