"""bf16 (or int8) against float32 on a `multiwoz-state` model, on identical inputs and chained.

    PYTHONPATH=src python scripts/state_agreement.py MODEL [--task multiwoz-slot-state] [--limit 1000]
        [--dtype bfloat16] [--quantize int8]

Two comparisons, because a chained evaluation feeds each turn the state the model predicted
at the turn before: one answer that the other precision rounds differently changes the next
turns' documents, so chained agreement counts a single difference many times.

- identical inputs: every turn's document holds the gold previous state
  (`previous="gold"`), so both precisions answer the same documents; the share
  of the 30 slot answers that are identical is the precision's own agreement;
- chained (what `pidec eval --task multiwoz-state` reports): the share of identical answers,
  and JGA and slot accuracy under each precision.

The first `--limit` turns of the test split, in dialogue order.
Prints one JSON object."""

import argparse
import json
import time

import pidec
from pidec.evaluate import evaluate
from pidec.tasks.multiwoz import MultiWOZSlotState, MultiWOZState


def answers(task_class, model_path: str, previous: str, limit: int, batch_size: int, **load):
    task = task_class(previous=previous)
    examples = task.load("test", limit=limit)
    model = pidec.load(model_path, **load)
    t = time.perf_counter()
    result = evaluate(model, task, examples, batch_size=batch_size)
    return result.predictions, result.metrics, time.perf_counter() - t


def same(a: list, b: list) -> tuple[int, int]:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs), len(pairs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--task", default="multiwoz-state", choices=["multiwoz-state", "multiwoz-slot-state"])
    a = p.parse_args()
    other = {"dtype": a.dtype if not a.quantize else "float32", "quantize": a.quantize}
    task_class = MultiWOZSlotState if a.task == "multiwoz-slot-state" else MultiWOZState
    out = {"model": a.model, "task": a.task, "turns": a.limit, "other": other}
    for previous in ("gold", "predicted"):
        ref, m_ref, s_ref = answers(task_class, a.model, previous, a.limit, a.batch_size, dtype="float32")
        oth, m_oth, s_oth = answers(task_class, a.model, previous, a.limit, a.batch_size, **other)
        k, n = same(ref, oth)
        out[previous] = {
            "identical": k,
            "subtasks": n,
            "agreement_pct": round(100 * k / n, 3),
            "float32": {name: m_ref[name] for name in ("joint_goal_accuracy", "slot_accuracy") if name in m_ref},
            "other": {name: m_oth[name] for name in ("joint_goal_accuracy", "slot_accuracy") if name in m_oth},
            "seconds": {"float32": round(s_ref, 1), "other": round(s_oth, 1)},
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
