"""Does a MultiWOZ model read the values in its document? For documents that differ only in the
value they mention, the mean log-probability of each candidate answer (the trainer's own
teacher-forced rows, `pidec.likelihood.answer_scores`). A model that reads them ranks `east` first
for the document that says east and `west` for the one that says west; a model that ignores the
document gives every document the same scores.

    PYTHONPATH=src python scripts/reads_document.py MODEL [--carried]

`--carried`: the prompts carry a previous value (`hotel area = none`), as `multiwoz-slot-state`'s
do; otherwise they are the plain slot prompts (`hotel area`) of `multiwoz`. Prints, per document,
the candidates' scores and the spread of each score across the documents (0: the document is not
read)."""

import argparse

import pidec
from pidec.likelihood import answer_scores

DOCUMENTS = (
    "user: i need a hotel in the east with 4 stars .",
    "user: i need a hotel in the west with 4 stars .",
    "user: i need a hotel in the north with 2 stars .",
    "user: i want a train to ely on friday .",
)
CANDIDATES = (
    ("hotel area", ("none", "east", "west", "north")),
    ("hotel stars", ("none", "4", "2")),
    ("train day", ("none", "friday", "monday")),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--carried", action="store_true", help="prompts carry `= none`, as multiwoz-slot-state's do")
    args = p.parse_args()
    model = pidec.load(args.model)
    prompts, answers, names = [], [], []
    for slot, values in CANDIDATES:
        for value in values:
            prompts.append(f"{slot} = none" if args.carried else slot)
            answers.append(value)
            names.append(f"{slot.split()[-1]}:{value}")
    table = [answer_scores(model, document, prompts, answers) for document in DOCUMENTS]
    for document, scores in zip(DOCUMENTS, table):
        print(f"{document:50s}", " ".join(f"{n}={s:.2f}" for n, s in zip(names, scores)))
    spread = [max(column) - min(column) for column in zip(*table)]
    print(f"{'spread across the documents':50s}", " ".join(f"{n}={s:.2f}" for n, s in zip(names, spread)))
    area = [j for j, prompt in enumerate(prompts) if prompt.startswith("hotel area")]
    first = [answers[max(area, key=scores.__getitem__)] for scores in table]
    print("hotel area ranked first:", ", ".join(first), "(a reader: east, west, north, none)")


if __name__ == "__main__":
    main()
