"""A synthetic booking-dialogue task that pidec generates itself: no files, no network.

`pidec demo` trains on it, and `pidec train / compare / eval --task booking` take it like any
other task (`BookingTask`: the demo's 12,000 training and 300 test conversations, seed 0, or the
`{split}.jsonl` files of a folder given as --data, such as the ones the demo writes).

A short conversation between a customer and an agent books a restaurant, a hotel and a taxi;
twelve slot prompts (`SLOTS`) each ask for one value, and the target is the value the customer
finally settled on, or "none" when the conversation does not set that slot. It is the shape of
the real workloads (one document, many questions), kept small (about 300 bytes a document, short
targets from fixed value lists) so that the demo can train a tiny byte-level T5 on it and show
prompt-in-decoder training and decoding end to end.

What makes the slots worth asking separately rather than trivially pattern-matched:

- Slots share value types: restaurant day / hotel day (weekdays), restaurant time / taxi leave at
  (clock times), restaurant area / hotel area (north, ...), restaurant people / hotel stars
  (small numbers). The domain word next to a value ("a table ...", "a room ...", "a taxi ...")
  or in the agent's question decides which slot it fills.
- Values are stated in several ways: inside a request ("i need a hotel in the north from friday"),
  or as a bare answer to the agent's question ("agent: what day do you check in?" /
  "user: friday please.").
- Distractors, each with a clear cue word, attached to a slot with probability `distractor_rate`:
  `rejected` (the agent offers a value, the customer says "no, ..." and gives another),
  `corrected` (the customer later says "actually, ..."), `declined` (the agent offers a value
  and the customer says "no, thanks": the slot stays none), and `other` (the same kind of value
  for a train or an attraction, which are not slots). The target is always the customer's last
  word for that slot, never the offered, replaced or other-domain value.

Turns are lines, "user: ..." (the customer) or "agent: ...". Everything is lowercase, values
included, and every value appears in the document exactly as its target is written: a copy, no
normalisation. Generation is deterministic: example i of a seed is
drawn from its own random stream, so `make_examples(5, s)` is a prefix of `make_examples(9, s)`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..data import DataError, Example, Subtask, read_jsonl
from .base import Task, TaskReport, check_predictions, references

NONE = "none"

AREAS = ["north", "south", "east", "west", "centre"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
TIMES = ["11:30", "12:00", "12:15", "12:45", "13:30", "17:00", "17:45", "18:00", "18:30", "19:00", "19:15", "20:00"]
FOODS = ["italian", "chinese", "indian", "french", "thai", "mexican", "british", "spanish", "korean", "greek"]
PRICES = ["cheap", "moderate", "expensive"]
PEOPLE = ["2", "3", "4", "5", "6", "7", "8"]
STARS = ["2", "3", "4", "5"]
HOTELS = [
    "acorn guest house",
    "alpha milton",
    "autumn house",
    "bridge guest house",
    "el shaddai",
    "finches",
    "hamilton lodge",
    "lensfield",
    "gonville",
    "warkworth house",
    "cityroomz",
    "avalon",
]
PLACES = [
    "the airport",
    "the bus station",
    "the museum",
    "the cinema",
    "the botanic garden",
    "the city hall",
    "the science park",
    "the hospital",
    "the grand arcade",
    "the theatre",
]

# the distractor kinds; each one's text carries a cue that `stats` counts (see _CUES)
REJECTED, CORRECTED, DECLINED, OTHER = "rejected", "corrected", "declined", "other"


@dataclass(frozen=True)
class Slot:
    """One slot: its prompt, its values, and the ways a conversation can talk about it.
    Every template has one "{}" where the value goes."""

    prompt: str
    domain: str
    values: list[str]
    phrases: list[str]  # after the domain noun: "a restaurant ___"
    questions: list[str]  # the agent asks for the value
    answers: list[str]  # the customer's bare answer to that question
    offers: list[str]  # the agent proposes a value
    corrections: list[str]  # the customer changes an earlier value
    others: list[str] = field(default_factory=list)  # the same kind of value for a train or an attraction


_TRAIN_DAY = ["i also need a train on {}.", "my train leaves on {}."]
_TRAIN_TIME = ["my train arrives at {}.", "i also need a train leaving at {}."]
_ATTRACTION = ["i'd also like to visit an attraction in the {}.", "are there any attractions in the {}?"]

_SLOTS = [
    Slot(
        "restaurant food",
        "restaurant",
        FOODS,
        ["serving {} food", "that serves {} food", "with {} food"],
        ["what food would you like?", "which cuisine?"],
        ["{} food, please.", "{} please.", "i'd like {} food."],
        ["how about {} food?", "there is a nice {} place, would that do?"],
        ["actually, make the restaurant {} instead.", "actually, i'd prefer {} food."],
    ),
    Slot(
        "restaurant area",
        "restaurant",
        AREAS,
        ["in the {}", "in the {} of town", "on the {} side of town"],
        ["what area for the restaurant?", "where should the restaurant be?"],
        ["the {} please.", "in the {}.", "the {} would be great."],
        ["i have a restaurant in the {}, is that ok?", "would the {} work for the restaurant?"],
        ["actually, i want the restaurant in the {}.", "actually, the restaurant should be in the {}."],
        _ATTRACTION,
    ),
    Slot(
        "restaurant price range",
        "restaurant",
        PRICES,
        ["in the {} price range", "that is {}", "with {} prices"],
        ["what price range?", "any price range in mind?"],
        ["{} please.", "something {}.", "the {} range."],
        ["i found a {} one, is that ok?", "how about somewhere {}?"],
        ["actually, make the restaurant {}.", "actually, i'd rather eat somewhere {}."],
    ),
    Slot(
        "restaurant people",
        "restaurant",
        PEOPLE,
        ["for {} people", "for a party of {}"],
        ["a table for how many?", "how many people?"],
        ["{} people.", "there will be {} of us.", "{} please."],
        ["shall i book the table for {} people?", "is the table for {}?"],
        ["actually, make the table for {} people.", "actually, there will be {} of us."],
        ["i need train tickets for {} people."],
    ),
    Slot(
        "restaurant day",
        "restaurant",
        DAYS,
        ["on {}", "this {}"],
        ["what day for the table?", "which day to eat?"],
        ["{} please.", "on {}.", "this {}."],
        ["i can book the table for {}, would that work?", "shall i reserve the table for {}?"],
        ["actually, move the table to {}.", "actually, make the reservation for {}."],
        _TRAIN_DAY,
    ),
    Slot(
        "restaurant time",
        "restaurant",
        TIMES,
        ["at {}", "around {}"],
        ["what time for the table?", "when do you want to eat?"],
        ["{} please.", "at {}.", "around {} would be good."],
        ["i have a table at {}, does that work?", "would {} suit you for the table?"],
        ["actually, move the table to {}.", "actually, make the table for {}."],
        _TRAIN_TIME,
    ),
    Slot(
        "hotel name",
        "hotel",
        HOTELS,
        ["called {}", "named {}"],
        ["any hotel in mind?", "which hotel?"],
        ["{} please.", "i'd like {}.", "the one called {}."],
        ["how about {}? it is a nice hotel.", "i can recommend {} for your stay."],
        ["actually, i'd rather stay at {}.", "actually, book the hotel {} instead."],
    ),
    Slot(
        "hotel area",
        "hotel",
        AREAS,
        ["in the {}", "in the {} of town", "on the {} side"],
        ["what area for the hotel?", "where do you want to stay?"],
        ["the {} please.", "in the {}.", "the {} would be great."],
        ["there is a hotel in the {}, would that do?", "how about a hotel in the {}?"],
        ["actually, i want the hotel in the {}.", "actually, a hotel in the {} is better."],
        _ATTRACTION,
    ),
    Slot(
        "hotel stars",
        "hotel",
        STARS,
        ["with {} stars", "rated {} stars", "that has {} stars"],
        ["how many stars?", "what star rating?"],
        ["{} stars.", "{} stars, please.", "one with {} stars."],
        ["i found a {} star hotel, is that ok?", "would {} stars be fine for the hotel?"],
        ["actually, make it a hotel with {} stars.", "actually, i need a hotel with {} stars."],
    ),
    Slot(
        "hotel day",
        "hotel",
        DAYS,
        ["from {}", "starting {}", "checking in on {}"],
        ["what day do you check in?", "when is the hotel from?"],
        ["{} please.", "from {}.", "starting {}."],
        ["shall i book the room from {}?", "the hotel has rooms from {}, is that ok?"],
        ["actually, i check in on {}.", "actually, book the room from {}."],
        _TRAIN_DAY,
    ),
    Slot(
        "taxi destination",
        "taxi",
        PLACES,
        ["to {}", "going to {}", "that takes me to {}"],
        ["where is the taxi going?", "taxi to where?"],
        ["to {}.", "{} please.", "i'm going to {}."],
        ["shall i book a taxi to {}?", "do you need a taxi to {}?"],
        ["actually, the taxi should go to {}.", "actually, the taxi should take me to {}."],
    ),
    Slot(
        "taxi leave at",
        "taxi",
        TIMES,
        ["leaving at {}", "to leave at {}", "that picks me up at {}"],
        ["when should the taxi come?", "taxi at what time?"],
        ["at {}.", "{} please.", "i want to leave at {}."],
        ["shall i have the taxi pick you up at {}?", "a taxi can leave at {}, is that ok?"],
        ["actually, the taxi should leave at {}.", "actually, have the taxi pick me up at {}."],
        _TRAIN_TIME,
    ),
]

SLOTS: list[str] = [s.prompt for s in _SLOTS]
SLOT = {s.prompt: s for s in _SLOTS}

# a request sentence per domain; "{}" takes that domain's phrases
_FRAMES = {
    "restaurant": [
        "i'm looking for a restaurant {}.",
        "can you find me a restaurant {}?",
        "i need a table {}.",
        "please book a restaurant {}.",
    ],
    "hotel": [
        "i need a hotel {}.",
        "i'm looking for a place to stay {}.",
        "please book a room {}.",
        "can you find me a hotel {}?",
    ],
    "taxi": ["i also need a taxi {}.", "please book a taxi {}.", "can you get me a taxi {}?", "i'll need a cab {}."],
}
_DECLINES = ["no, thanks.", "no, that is not needed.", "no, i don't need that."]
_FILLERS = ["sure.", "okay.", "i can help with that.", "let me check.", "certainly.", "noted."]
_OPENERS = ["hi, i need some bookings.", "hello, can you help me?"]
_GREETINGS = ["hi, ", "hello, ", ""]
_CLOSING = [("agent", "anything else?"), ("user", "that is all, thanks.")]

# One cue per distractor sentence and none anywhere else; `stats` counts them.
_CUES = re.compile(r"\bno, |\bactually, |\btrain\b|\battraction")

DEFAULTS = {"none_rate": 0.5, "distractor_rate": 0.08, "answer_rate": 0.2, "max_chars": 400}


@dataclass
class Distractor:
    kind: str  # REJECTED, CORRECTED, DECLINED or OTHER
    wrong: str  # the value that must not become the target


@dataclass
class Booking:
    """What a conversation will say: each slot's final value (None: not set) and its distractors."""

    values: dict[str, str | None]
    distractors: dict[str, Distractor] = field(default_factory=dict)

    def targets(self) -> list[str]:
        return [self.values[p] or NONE for p in SLOTS]


def draw_booking(rng: random.Random, none_rate: float, distractor_rate: float) -> Booking:
    """Draw which slots are set, their values, and which slots get a distractor. At least one
    slot is set. A set slot can get any kind; an unset one only `declined` or `other`, so
    that the distractor never sets it."""
    values: dict[str, str | None] = {}
    for slot in _SLOTS:
        values[slot.prompt] = None if rng.random() < none_rate else rng.choice(slot.values)
    if not any(values.values()):
        slot = rng.choice(_SLOTS)
        values[slot.prompt] = rng.choice(slot.values)
    distractors = {}
    for slot in _SLOTS:
        if rng.random() >= distractor_rate:
            continue
        value = values[slot.prompt]
        kinds = [REJECTED, CORRECTED] if value else [DECLINED]
        kinds += [OTHER] if slot.others else []
        wrong = rng.choice([v for v in slot.values if v != value])
        distractors[slot.prompt] = Distractor(rng.choice(kinds), wrong)
    return Booking(values, distractors)


def render(booking: Booking, rng: random.Random, answer_rate: float = DEFAULTS["answer_rate"]) -> str:
    """The conversation, one "user: ..." or "agent: ..." turn a line.

    Each set slot is stated either in a request sentence with the other slots of its domain (one
    sentence, or two), or (with probability `answer_rate`) as a bare answer to the agent's
    question. Segments come in random order; a correction always comes after what it corrects."""
    segments: list[list[tuple[str, str]]] = []  # each: (speaker, text) turns, ending with the customer
    in_requests: dict[str, list[tuple[Slot, str]]] = {}  # domain -> (slot, value) stated in requests
    corrections: list[tuple[str, list[tuple[str, str]]]] = []  # (slot, its correction segment)
    for slot in _SLOTS:
        value = booking.values[slot.prompt]
        d = booking.distractors.get(slot.prompt)
        kind = d.kind if d else None
        if kind == REJECTED:
            reply = "no, " + rng.choice(slot.answers).format(value)
            segments.append([("agent", rng.choice(slot.offers).format(d.wrong)), ("user", reply)])
        elif kind == DECLINED:
            segments.append([("agent", rng.choice(slot.offers).format(d.wrong)), ("user", rng.choice(_DECLINES))])
        elif kind == CORRECTED:
            in_requests.setdefault(slot.domain, []).append((slot, d.wrong))
            corrections.append((slot.prompt, [("user", rng.choice(slot.corrections).format(value))]))
        if kind == OTHER:
            segments.append([("user", rng.choice(slot.others).format(d.wrong))])
        if value is None or kind in (REJECTED, CORRECTED):
            continue
        if rng.random() < answer_rate:
            question, answer = rng.choice(slot.questions), rng.choice(slot.answers).format(value)
            segments.append([("agent", question), ("user", answer)])
        else:
            in_requests.setdefault(slot.domain, []).append((slot, value))
    owner: dict[str, list] = {}  # slot -> the request segment that states it, to order corrections
    for domain, stated in in_requests.items():
        rng.shuffle(stated)
        cut = rng.randint(1, len(stated) - 1) if len(stated) > 1 and rng.random() < 0.4 else len(stated)
        for chunk in (stated[:cut], stated[cut:]) if cut < len(stated) else (stated,):
            phrases = " ".join(rng.choice(slot.phrases).format(value) for slot, value in chunk)
            segment = [("user", rng.choice(_FRAMES[domain]).format(phrases))]
            segments.append(segment)
            owner.update((slot.prompt, segment) for slot, _ in chunk)
    rng.shuffle(segments)
    for prompt, correction in corrections:
        after = next(i for i, seg in enumerate(segments) if seg is owner[prompt])
        segments.insert(rng.randint(after + 1, len(segments)), correction)
    return _turns(segments, rng)


def _turns(segments: list[list[tuple[str, str]]], rng: random.Random) -> str:
    """Join segments into a conversation that the customer opens: two customer segments in a row
    share a turn or get an agent filler between them; half the conversations end with a closing."""
    turns: list[tuple[str, str]] = []
    for segment in segments:
        if turns and turns[-1][0] == "user" and segment[0][0] == "user":
            if rng.random() < 0.7:
                turns[-1] = ("user", turns[-1][1] + " " + segment[0][1])
                segment = segment[1:]
            else:
                turns.append(("agent", rng.choice(_FILLERS)))
        turns.extend(segment)
    if turns[0][0] == "agent":
        turns.insert(0, ("user", rng.choice(_OPENERS)))
    else:
        turns[0] = ("user", rng.choice(_GREETINGS) + turns[0][1])
    if rng.random() < 0.3:
        turns.extend(_CLOSING)
    return "\n".join(f"{speaker}: {text}" for speaker, text in turns)


def _knobs(knobs: dict) -> dict:
    unknown = set(knobs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown knob(s) {', '.join(sorted(unknown))}; expected {', '.join(DEFAULTS)}")
    knobs = DEFAULTS | knobs
    for name in ("none_rate", "distractor_rate", "answer_rate"):
        if not 0.0 <= knobs[name] <= 1.0:
            raise ValueError(f"{name}={knobs[name]} must be between 0 and 1")
    return knobs


def _example(seed: int, prefix: str, i: int, k: dict) -> tuple[Booking, Example]:
    """Example i of a stream, from its own random generator (seeded by seed, prefix and i), so
    that it does not depend on how many come before it. A conversation longer than max_chars is
    redrawn from the same generator."""
    rng = random.Random(f"{seed}/{prefix}/{i}")
    for _ in range(1000):
        booking = draw_booking(rng, k["none_rate"], k["distractor_rate"])
        document = render(booking, rng, k["answer_rate"])
        if len(document) <= k["max_chars"]:
            break
    else:
        raise ValueError(f"max_chars={k['max_chars']}: no conversation that short in 1000 draws; raise max_chars")
    subtasks = [Subtask(p, t) for p, t in zip(SLOTS, booking.targets())]
    return booking, Example(f"{prefix}-{i}", document, subtasks)


def _generate(n: int, seed: int, prefix: str = "syn", **knobs) -> list[tuple[Booking, Example]]:
    """make_examples with the bookings behind the examples, for tests."""
    k = _knobs(knobs)
    return [_example(seed, prefix, i, k) for i in range(n)]


def make_examples(n: int, seed: int, id_prefix: str = "syn", **knobs) -> list[Example]:
    """n examples, ids "{id_prefix}-i", each with all twelve SLOTS in order. Knobs (defaults in
    DEFAULTS): none_rate: chance that a slot is not set; distractor_rate: chance that a slot gets
    a distractor; answer_rate: chance that a set value is a bare answer to the agent's question
    rather than part of a request; max_chars: longest document (longer draws are redrawn, which
    favours draws with fewer set slots and distractors: with the defaults about 15% are redrawn,
    and `stats` measures none_rate ~0.52 and distractor_rate ~0.064 rather than 0.5 and 0.08)."""
    return [ex for _, ex in _generate(n, seed, id_prefix, **knobs)]


def make_splits(train: int, test: int, seed: int, **knobs) -> tuple[list[Example], list[Example]]:
    """Train and test sets from separate streams, ids "train-i" / "test-i". A test conversation
    identical to a training one (or to an earlier test one) is skipped and the stream goes on, so
    no document is in both splits; test ids then skip a number."""
    k = _knobs(knobs)
    train_set = [_example(seed, "train", i, k)[1] for i in range(train)]
    seen = {ex.document for ex in train_set}
    test_set: list[Example] = []
    i = 0
    while len(test_set) < test:
        ex = _example(seed, "test", i, k)[1]
        i += 1
        if ex.document not in seen:
            seen.add(ex.document)
            test_set.append(ex)
        if i > 100 * test + 1000:
            raise ValueError(f"only {len(test_set)} of {test} test conversations differ from the training ones")
    return train_set, test_set


def stats(examples: list[Example]) -> dict:
    """Numbers for tests and the demo's printout. Distractors are counted from their cue words
    ("no, ", "actually, ", "train", "attraction"), which appear in no other sentence."""
    if not examples:
        raise ValueError("stats of no examples")
    chars = [len(ex.document) for ex in examples]
    none_by_slot = Counter()
    for ex in examples:
        for s in ex.subtasks:
            none_by_slot[s.prompt] += s.target == NONE
    distractors = [len(_CUES.findall(ex.document)) for ex in examples]
    n, slots = len(examples), sum(len(ex.subtasks) for ex in examples)
    return {
        "examples": n,
        "mean_chars": sum(chars) / n,
        "min_chars": min(chars),
        "max_chars": max(chars),
        "max_target_bytes": max(len(s.target.encode()) for ex in examples for s in ex.subtasks),
        "none_rate": sum(none_by_slot.values()) / slots,
        "none_rate_by_slot": {p: none_by_slot[p] / n for p in SLOTS},
        "distractor_rate": sum(distractors) / slots,  # distractors per slot
        "examples_with_distractor": sum(d > 0 for d in distractors) / n,
    }


def describe(**knobs) -> str:
    """A few lines saying what the task is, for the demo's printout."""
    k = _knobs(knobs)
    return (
        f"synthetic booking dialogues: a customer and an agent book a restaurant, a hotel and a taxi.\n"
        f"{len(SLOTS)} slots: {', '.join(SLOTS)}.\n"
        f"target: the customer's final value, copied from the text, or '{NONE}' "
        f"(none_rate={k['none_rate']}); distractors (offers turned down, corrections, train and attraction "
        f"values) on {k['distractor_rate']:.0%} of slots; bare answers to the agent's questions for "
        f"{k['answer_rate']:.0%} of values; documents up to {k['max_chars']} characters."
    )


class BookingTask(Task):
    """The demo's task by name. Without --data the splits are generated (deterministic in
    `seed`); with a folder, its `{split}.jsonl` files are read. Metrics in percent: joint
    accuracy (every slot of a conversation right), slot accuracy, and the slots that are not
    none, right."""

    name = "booking"
    description = "the demo's synthetic booking conversations, 12 slots (generated; or --data FOLDER of {split}.jsonl)"
    default_path = None
    splits = ("train", "test")
    split_aliases: ClassVar[dict[str, str]] = {"dev": "test", "validation": "test"}
    main_metric = "joint_accuracy"
    max_new_tokens = 8

    def __init__(self, train_examples: int = 12000, test_examples: int = 300, seed: int = 0):
        self.sizes = {"train": train_examples, "test": test_examples}
        self.seed = seed

    def resolve(self, path) -> Path | None:
        return None if path is None else super().resolve(path)

    def read(self, split: str, path: Path | None, report: TaskReport) -> list[Example]:
        if path is None:
            train, test = make_splits(self.sizes["train"], self.sizes["test"], self.seed)
            return train if split == "train" else test
        file = path / f"{split}.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"task booking: {file} not found (a folder of train.jsonl and test.jsonl, as the demo writes)"
            )
        return read_jsonl(file)

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        check_predictions(examples, predictions)
        right = filled = filled_right = joint = 0
        for ex, pred in zip(examples, predictions):
            golds = [self.normalize(g[0]) for g in references(ex)]
            oks = [self.normalize(p) == g for p, g in zip(pred, golds)]
            right += sum(oks)
            joint += all(oks)
            filled += sum(g != NONE for g in golds)
            filled_right += sum(ok and g != NONE for ok, g in zip(oks, golds))
        slots = sum(len(ex.subtasks) for ex in examples)
        return {
            "joint_accuracy": 100.0 * joint / len(examples),
            "slot_accuracy": 100.0 * right / slots,
            "filled_slot_accuracy": 100.0 * filled_right / filled if filled else 0.0,
            "examples": len(examples),
            "subtasks": slots,
        }
