"""The wrong slot answers of a MultiWOZ state-tracking model, by kind, with the gold previous
states given (the oracle: no chaining), so that each error is the model's own at that turn.

    PYTHONPATH=src python scripts/state_errors.py MODEL [--task multiwoz-state] [--split dev] [--limit 200]
    PYTHONPATH=src python scripts/state_errors.py --predictions OUT/multiwoz-test-pid.predictions.jsonl --task multiwoz --split test

With `--predictions`, the answers a `pidec eval` run wrote for the task and split are counted
instead of running a model (for a chained evaluation, the chained answers, still classified
against the gold previous state).

Kinds: a value where the gold answer is `none` ("invented"); the gold value was in the previous
state (the document's state line for `multiwoz-state`, the slot's own prompt for
`multiwoz-slot-state`, the gold state of the turn before for `multiwoz`, which reads the whole
history) and another value or `none` was answered ("failed copy"); a new value missed or
answered wrongly. Prints the metrics, the counts by kind and by slot, JGA by turn index, and
examples."""

import argparse
import collections
import json
import sys

import pidec
from pidec.evaluate import evaluate
from pidec.tasks.multiwoz import SLOT_PROMPT_SEPARATOR, MultiWOZ, MultiWOZSlotState, MultiWOZState, dialogue_turn


def previous_holds(task_name: str, document: str, prompt: str, gold: str, before: dict[str, str]) -> bool:
    if task_name == "multiwoz":
        return before.get(prompt) == gold
    if task_name == "multiwoz-slot-state":
        return prompt.split(SLOT_PROMPT_SEPARATOR, 1)[1] == gold
    return f"{prompt} = {gold}" in document.split("\n", 1)[0]


def read_predictions(task, split: str, path: str):
    """The split's examples that a predictions file answers, in the file's order, and the answers;
    a record whose id or prompts the split does not have stops with the line number."""
    by_id = {ex.id: ex for ex in task.load(split)}
    examples, answers = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            ex = by_id.get(rec["id"])
            if ex is None or list(ex.prompts) != list(rec["prompts"]):
                sys.exit(f"{path}:{n}: {rec['id']!r} is not an example of {task.name} {split} with these prompts")
            examples.append(ex)
            answers.append(rec["predictions"])
    return examples, answers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--predictions", help="a predictions JSONL written by pidec eval, counted instead of running MODEL")
    p.add_argument("--task", default="multiwoz-state", choices=["multiwoz", "multiwoz-state", "multiwoz-slot-state"])
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--examples", type=int, default=12)
    a = p.parse_args()
    if a.task == "multiwoz":
        task = MultiWOZ()
    else:
        task = (MultiWOZSlotState if a.task == "multiwoz-slot-state" else MultiWOZState)(previous="gold")
    if (a.model is None) == (a.predictions is None):
        sys.exit("give a MODEL or --predictions FILE (one of them)")
    if a.predictions:
        examples, answers_of = read_predictions(task, a.split, a.predictions)
        metrics = task.score(examples, answers_of)
    else:
        examples = task.load(a.split, limit=a.limit)
        result = evaluate(pidec.load(a.model), task, examples, batch_size=64, warmup=False)
        examples, answers_of, metrics = result.examples, result.predictions, result.metrics
    print({k: round(v, 2) for k, v in metrics.items() if not k.startswith("turns")})
    kinds, slots, shown = collections.Counter(), collections.Counter(), []
    by_turn, right_by_turn, before, dialogue = collections.Counter(), collections.Counter(), {}, None
    for ex, answers in zip(examples, answers_of):
        name, turn = dialogue_turn(ex.id)
        if name != dialogue:
            dialogue, before = name, {}
        gold_state = dict(zip(ex.prompts, ex.targets))
        wrong = 0
        refs = getattr(ex, "references", None) or [[t] for t in ex.targets]
        for i, (prompt, golds, answer) in enumerate(zip(ex.prompts, refs, answers)):
            gold = golds[0]
            if task.normalize(answer, i) in {task.normalize(g, i) for g in golds}:
                continue
            wrong += 1
            if gold == "none":
                kind = "invented"
            elif previous_holds(a.task, ex.document, prompt, gold, before):
                kind = "failed copy (none)" if answer == "none" else "failed copy (other value)"
            else:
                kind = "new value missed" if answer == "none" else "new value wrong"
            kinds[kind] += 1
            slots[prompt.split(SLOT_PROMPT_SEPARATOR, 1)[0]] += 1
            if len(shown) < a.examples:
                shown.append((ex.id, prompt, gold, answer))
        bucket = min(turn, 10)
        by_turn[bucket] += 1
        right_by_turn[bucket] += wrong == 0
        before = gold_state
    print("wrong answers:", sum(kinds.values()), dict(kinds.most_common()))
    print("by slot:", dict(slots.most_common(12)))
    print(
        "turns wholly right by turn index (10: 10 and later):",
        {t: f"{right_by_turn[t]}/{by_turn[t]}" for t in sorted(by_turn)},
    )
    for s in shown:
        print(s)


if __name__ == "__main__":
    main()
