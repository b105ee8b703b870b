"""MultiWOZ 2.1 dialogue state tracking: one example per user turn, one subtask per domain-slot.

Two formats are read:

- the turn-level TSV of the STAR/SUMBT preprocessing (`train.tsv`, `dev.tsv`, `test.tsv`; header
  `# Dialogue ID, Turn Index, Last Turn, System Response, User Utterance, <30 slots>`; a cell holds
  the cumulative value of its slot, `none`, or alternatives `a|b`);
- the original release (`data.json` with `valListFile`/`testListFile` beside it, or one file per
  split such as ConvLab's `val.json.zip`): `{dialogue_id: {goal, log: [{text, metadata}]}}`, the
  state of user turn t being the metadata of the system turn after it. Raw labels get the
  usual TRADE/SUMBT clean-up (typos, `not mentioned` -> none, dontcare, 12h times, domains outside
  the dialogue's goal -> none), so both formats give the same labels.

Values are compared in one canonical form for both formats (`canonical`): `do not care`,
`guest house`, `hotel` / `guest house` for hotel type and `yes` / `no` for parking and internet
(the TSV's true/false, said as the dialogue says them, which is what a generative model writes).

The document is the dialogue up to the turn, one utterance a line (`user: ...`, `system: ...`).
When it is longer than the encoder allows, the oldest utterances are dropped first (counted).
The task `multiwoz-state` (`MultiWOZState`) reads the previous dialogue state and the last
turn instead, and is evaluated with the model's own predicted states chained turn by turn.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import zipfile
from pathlib import Path
from typing import ClassVar

from ..data import DataError, Example, Subtask
from ..layouts import CARRIED_SEPARATOR
from .base import (
    Task,
    TaskExample,
    TaskReport,
    check_predictions,
    cut_to_fit,
    document_room,
    references,
    replace_document,
    token_spans,
)

DOMAINS = ("attraction", "hotel", "restaurant", "taxi", "train")
SLOTS = (
    "attraction-area",
    "attraction-name",
    "attraction-type",
    "hotel-area",
    "hotel-book day",
    "hotel-book people",
    "hotel-book stay",
    "hotel-internet",
    "hotel-name",
    "hotel-parking",
    "hotel-pricerange",
    "hotel-stars",
    "hotel-type",
    "restaurant-area",
    "restaurant-book day",
    "restaurant-book people",
    "restaurant-book time",
    "restaurant-food",
    "restaurant-name",
    "restaurant-pricerange",
    "taxi-arriveby",
    "taxi-departure",
    "taxi-destination",
    "taxi-leaveat",
    "train-arriveby",
    "train-book people",
    "train-day",
    "train-departure",
    "train-destination",
    "train-leaveat",
)
_READABLE = {"pricerange": "price range", "arriveby": "arrive by", "leaveat": "leave at"}
PROMPTS = tuple(" ".join([s.split("-")[0]] + [_READABLE.get(w, w) for w in s.split("-")[1].split()]) for s in SLOTS)
SLOT_OF_PROMPT = dict(zip(PROMPTS, SLOTS))
NONE = "none"
DONTCARE = "do not care"
TSV_COLUMNS = ("# Dialogue ID", "Turn Index", "Last Turn", "System Response", "User Utterance")
SPLIT_FILES = {"train": ("train",), "dev": ("dev", "val", "valid", "validation"), "test": ("test",)}

_DONTCARE = {"dontcare", "dont care", "don't care", "do n't care", "do not care", "does not care", "any"}
_EMPTY = {"", "none", "not mentioned", "not given", "null"}
_YES = {"yes", "true", "free", "y"}
_NO = {"no", "false", "n"}
# TRADE's GENERAL_TYPO (trade-dst utils/fix_label.py), for raw annotations only
_RAW_TYPOS = {
    "guesthouse": "guest house",
    "guesthouses": "guest house",
    "guest": "guest house",
    "mutiple sports": "multiple sports",
    "sports": "multiple sports",
    "mutliple sports": "multiple sports",
    "swimmingpool": "swimming pool",
    "concerthall": "concert hall",
    "concert": "concert hall",
    "pool": "swimming pool",
    "night club": "nightclub",
    "mus": "museum",
    "ol": "architecture",
    "colleges": "college",
    "coll": "college",
    "architectural": "architecture",
    "musuem": "museum",
    "churches": "church",
    "center": "centre",
    "center of town": "centre",
    "near city center": "centre",
    "in the north": "north",
    "cen": "centre",
    "east side": "east",
    "east area": "east",
    "west part of town": "west",
    "ce": "centre",
    "town center": "centre",
    "centre of cambridge": "centre",
    "city center": "centre",
    "the south": "south",
    "scentre": "centre",
    "town centre": "centre",
    "in town": "centre",
    "north part of town": "north",
    "centre of town": "centre",
    "cb30aq": "none",
    "mode": "moderate",
    "moderate -ly": "moderate",
    "mo": "moderate",
    "next friday": "friday",
    "monda": "monday",
    "free parking": "free",
    "free internet": "yes",
    "4 star": "4",
    "4 stars": "4",
    "0 star rarting": "none",
    "not men": "none",
    "not": "none",
    "not mendtioned": "none",
    "3 .": "3",
    "does not": "no",
    "fun": "none",
    "art": "none",
}
# the release's text normalisation (budzianowski/multiwoz create_data.py, as STAR applies it to
# labels) and the systematic misspellings STAR fixes
_RAW_SPELLING = (
    (r"(\u2018|\u2019)", "'"),
    (r"b ?& ?b|b and b", "bed and breakfast"),
    (r"(?<=[a-z])-(?=[a-z])", " "),
    (r"archaelogy", "archaeology"),
    (r"anthropogy", "anthropology"),
    (r"portugese", "portuguese"),
    (r"theater", "theatre"),
    (r"musuem", "museum"),
)
_TIME_SLOTS = {"taxi-arriveby", "taxi-leaveat", "train-arriveby", "train-leaveat", "restaurant-book time"}


def normalize_time(text: str) -> str:
    """12-hour and sloppy times to hh:mm (the SUMBT/STAR preprocessing's rules)."""
    text = re.sub(r"(\d{1})(a\.?m\.?|p\.?m\.?)", r"\1 \2", text)
    text = re.sub(r"(^| )(\d{1,2}) (a\.?m\.?|p\.?m\.?)", r"\1\2:00 \3", text)
    text = re.sub(r"(^| )(at|from|by|until|after) ?(\d{1,2}) ?(\d{2})([^0-9]|$)", r"\1\2 \3:\4\5", text)
    text = re.sub(r"(^| )(\d{2})[;.,](\d{2})", r"\1\2:\3", text)
    text = re.sub(r"(^| )(at|from|by|until|after) ?(\d{1,2})([;., ]|$)", r"\1\2 \3:00\4", text)
    text = re.sub(r"(^| )(\d{1}:\d{2})", r"\g<1>0\2", text)
    text = re.sub(
        r"(\d{2})(:\d{2}) ?p\.?m\.?",
        lambda m: str(int(m.group(1)) + 12 if int(m.group(1)) < 12 else int(m.group(1))) + m.group(2),
        text,
    )
    return re.sub(r"(^| )24:(\d{2})", r"\g<1>00:\2", text)


@functools.lru_cache(maxsize=65536)
def canonical(slot: str, value: str) -> str:
    """One value in the form both formats and the model's answers are compared in. No value
    holds a ';', so an answer runs to the first one (a seq output whose separator was lost)."""
    v = " ".join(value.lower().split(";", 1)[0].split()).strip(" .,!?")
    if v in _EMPTY:
        return NONE
    if v in _DONTCARE:
        return DONTCARE
    v = v.replace("guesthouse", "guest house").replace("theater", "theatre")
    if slot in ("hotel-parking", "hotel-internet"):
        return "yes" if v in _YES else "no" if v in _NO else v
    if slot == "hotel-type":
        return "hotel" if v in ("hotel", "true") else "guest house" if v in ("guest house", "false") else v
    if slot in _TIME_SLOTS:
        v = re.sub(r"^(\d):(\d\d)$", r"0\1:\2", v)
    return v


def alternatives(slot: str, value: str) -> list[str]:
    """`a|b` (an annotated value with two accepted readings) -> both, canonical."""
    return [canonical(slot, v) for v in value.split("|")]


@functools.lru_cache(maxsize=65536)
def raw_label(slot: str, value: str) -> str:
    """A value from the original release's metadata, cleaned as TRADE/STAR clean it."""
    v = " ".join(value.lower().split())
    for wrong, right in _RAW_SPELLING:
        v = re.sub(wrong, right, v)
    v = " ".join(v.split())
    v = _RAW_TYPOS.get(v, v)
    if slot == "hotel-type" and v in (
        "nigh",
        "moderate -ly priced",
        "bed and breakfast",
        "centre",
        "venetian",
        "intern",
    ):
        v = NONE
    elif slot == "hotel-type" and v in ("hotel with free parking and free wifi", "4", "3 star hotel"):
        v = "hotel"
    elif (
        slot == "hotel-internet"
        and v == "4"
        or slot == "hotel-pricerange"
        and v == "2"
        or slot == "attraction-type"
        and v in ("gastropub", "la raza", "galleria", "gallery", "science", "m")
    ):
        v = NONE
    elif "area" in slot:
        v = {"no": "north", "we": "west", "cent": "centre", "moderate": NONE}.get(v, v)
    elif "day" in slot:
        v = {"we": "wednesday", "no": NONE, "t": NONE}.get(v, v)
    elif "price" in slot and v == "ch":
        v = "cheap"
    if slot == "restaurant-area" and v in ("stansted airport", "cambridge", "silver street"):
        v = NONE
    if slot == "attraction-area" and v in ("norwich", "ely", "museum", "same area as hotel"):
        v = NONE
    if slot in _TIME_SLOTS:
        v = normalize_time(v)
    return canonical(slot, v)


def history(turns: list[tuple[str, str]]) -> str:
    """[(system response before the turn, user utterance)] -> one utterance a line."""
    lines = []
    for system, user in turns:
        if system.strip():
            lines.append(f"system: {' '.join(system.split())}")
        lines.append(f"user: {' '.join(user.split())}")
    return "\n".join(lines)


def turn_example(dialogue: str, turn: int, turns: list[tuple[str, str]], state: list[str], where: str) -> TaskExample:
    refs = [alternatives(slot, value) for slot, value in zip(SLOTS, state)]
    for slot, values in zip(SLOTS, refs):
        if any(not v for v in values):
            raise DataError(f"{where}: slot {slot}: empty value in {state[SLOTS.index(slot)]!r}")
    subtasks = [Subtask(prompt, values[0]) for prompt, values in zip(PROMPTS, refs)]
    return TaskExample(f"{dialogue}:{turn}", history(turns), subtasks, references=refs)


# -- the TSV format ---------------------------------------------------------------------------


def read_tsv(path: Path) -> list[TaskExample]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty file")
    header = [c for c in rows[0] if c != ""]
    if tuple(header[:5]) != TSV_COLUMNS:
        raise DataError(f"{path}:1: expected the columns {', '.join(TSV_COLUMNS)} first, got {header[:5]}")
    if tuple(header[5:]) != SLOTS:
        unknown = [c for c in header[5:] if c not in SLOTS] or sorted(set(SLOTS) - set(header[5:]))
        raise DataError(f"{path}:1: the slot columns differ from MultiWOZ's 30 (first difference: {unknown[:3]})")
    width = len(header)
    examples: list[TaskExample] = []
    turns: list[tuple[str, str]] = []
    current = None
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != width:
            raise DataError(f"{path}:{n}: {len(row)} fields, expected {width}")
        dialogue, index = row[0].removesuffix(".json"), row[1]
        if not index.isdigit():
            raise DataError(f"{path}:{n}: Turn Index {index!r} is not a number")
        if dialogue != current:
            current, turns = dialogue, []
        if int(index) != len(turns):
            raise DataError(f"{path}:{n}: dialogue {dialogue}: turn {index} follows turn {len(turns) - 1}")
        turns.append((row[3], row[4]))
        examples.append(turn_example(dialogue, int(index), list(turns), row[5:], f"{path}:{n}"))
    return examples


# -- the original release ---------------------------------------------------------------------


def load_json(path: Path):
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".json")]
                if len(names) != 1:
                    raise DataError(f"{path}: expected one .json file in the archive, found {names}")
                return json.loads(z.read(names[0]))
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a zip archive ({e})") from None


def _raw_slot(domain: str, kind: str, name: str) -> str:
    name = name.lower()
    return f"{domain}-book {name}" if kind == "book" else f"{domain}-{name}"


def read_raw(path: Path, report: TaskReport, keep: set[str] | None = None) -> list[TaskExample]:
    """The original release format; `keep` limits it to those dialogue ids (data.json + lists)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of dialogues keyed by id, got {type(data).__name__}")
    examples: list[TaskExample] = []
    for dialogue, body in data.items():
        name = dialogue.removesuffix(".json")
        if keep is not None and name not in keep:
            continue
        where = f"{path}: dialogue {dialogue}"
        if not isinstance(body, dict) or not isinstance(body.get("log"), list):
            raise DataError(f"{where}: expected an object with a 'log' list")
        log = body["log"]
        if len(log) % 2:
            report.skipped["dialogues with an odd number of utterances"] += 1
            continue
        goal = body.get("goal") or {}
        active = {d for d in DOMAINS if goal.get(d)}
        turns: list[tuple[str, str]] = []
        previous = [NONE] * len(SLOTS)
        for t in range(len(log) // 2):
            user, system_after = log[2 * t], log[2 * t + 1]
            for k, entry in ((2 * t, user), (2 * t + 1, system_after)):
                if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                    raise DataError(f"{where}: log[{k}].text must be a string")
            system_before = log[2 * t - 1]["text"] if t else ""
            turns.append((system_before.lower(), user["text"].lower()))
            metadata = system_after.get("metadata")
            if not metadata:  # an unannotated system turn: the state carries over
                state = list(previous)
                report.changes["turns without metadata (state carried over)"] += 1
            else:
                state = _state(metadata, active, f"{where}: log[{2 * t + 1}].metadata")
            examples.append(turn_example(name, t, list(turns), state, where))
            previous = state
    return examples


def _state(metadata: dict, active: set[str], where: str) -> list[str]:
    values = dict.fromkeys(SLOTS, NONE)
    for domain in DOMAINS:
        block = metadata.get(domain)
        if not isinstance(block, dict):
            raise DataError(f"{where}: missing domain {domain!r}")
        for kind in ("semi", "book"):
            for name, value in (block.get(kind) or {}).items():
                slot = _raw_slot(domain, kind, name)
                if slot not in values or not isinstance(value, str):
                    continue  # 'booked' lists, bus/hospital/police slots, ticket
                values[slot] = raw_label(slot, value) if domain in active else NONE
    return [values[s] for s in SLOTS]


def _split_list(folder: Path, stem: str) -> set[str] | None:
    for name in (f"{stem}.txt", f"{stem}.json"):
        p = folder / name
        if p.is_file():
            return {line.strip().removesuffix(".json") for line in p.read_text().splitlines() if line.strip()}
    return None


class MultiWOZ(Task):
    name = "multiwoz"
    description = "MultiWOZ 2.1 dialogue state tracking: 30 domain-slots per user turn (TSV or data.json format)"
    default_path = "multiwoz21"
    splits = ("train", "dev", "test")
    split_aliases: ClassVar[dict[str, str]] = {"val": "dev", "valid": "dev", "validation": "dev"}
    main_metric = "joint_goal_accuracy"
    seq_omit = NONE  # a seq target lists the filled slots only; a slot it leaves out reads as none
    max_new_tokens = 16

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        if path.is_file():
            return self._read_file(path, split, report)
        for stem in SPLIT_FILES[split]:
            for name in (f"{stem}.tsv", f"{stem}.json", f"{stem}.json.zip", f"{stem}_dials.json"):
                if (path / name).is_file():
                    return self._read_file(path / name, split, report)
        if (path / "data.json").is_file():
            return self._read_file(path / "data.json", split, report)
        names = ", ".join(f"{s}.tsv / {s}.json(.zip)" for s in SPLIT_FILES[split])
        raise DataError(f"{path}: no file for split {split!r} (looked for {names}, data.json)")

    def _read_file(self, path: Path, split: str, report: TaskReport) -> list[Example]:
        if path.suffix == ".tsv":
            return read_tsv(path)
        if path.name == "data.json":
            val, test = _split_list(path.parent, "valListFile"), _split_list(path.parent, "testListFile")
            if val is None or test is None:
                raise DataError(f"{path}: data.json needs valListFile.txt and testListFile.txt beside it")
            if split == "train":
                everything = {k.removesuffix(".json") for k in load_json(path)}
                return read_raw(path, report, keep=everything - val - test)
            return read_raw(path, report, keep=val if split == "dev" else test)
        if path.name.endswith((".json", ".json.zip", ".zip")):
            return read_raw(path, report)
        raise DataError(f"{path}: expected a .tsv file or the original JSON format (.json, .json.zip)")

    # -- fitting: drop the oldest utterances --------------------------------------------------

    def fit(self, examples, tokenizer, max_input_tokens, report):
        room = document_room(max_input_tokens)
        lines_of = [ex.document.split("\n") for ex in examples]
        unique = sorted({line for lines in lines_of for line in lines})
        count = dict(zip(unique, (len(ids) for ids in tokenizer(unique, add_special_tokens=False)["input_ids"])))
        # what a line break costs: nothing where the tokenizer reads it as a space (T5's), a token
        # of its own in a byte-level BPE; each line but the first is counted with one
        joined = len(tokenizer("a\nb", add_special_tokens=False)["input_ids"])
        apart = sum(len(ids) for ids in tokenizer(["a", "b"], add_special_tokens=False)["input_ids"])
        newline = max(0, joined - apart)
        out = []
        for ex, lines in zip(examples, lines_of):
            sizes = [count[line] + (newline if i else 0) for i, line in enumerate(lines)]
            if sum(sizes) <= room:
                out.append([ex])
                continue
            start, total = 0, sum(sizes)
            while start < len(lines) - 1 and total > room:
                total -= sizes[start]
                start += 1
            kept = lines[start:]
            report.changes["dialogue histories cut from the oldest utterance"] += 1
            report.changes["utterances dropped"] += start
            if total > room:  # the last utterance alone is too long: keep its end
                kept = [cut_to_fit(kept[0], token_spans(tokenizer, kept)[0], tokenizer, room, keep="end")]
                report.changes["last utterances cut inside"] += 1
            report.truncated += 1
            out.append([TaskExample(ex.id, "\n".join(kept), ex.subtasks, references=getattr(ex, "references", None))])
        return out

    # -- answers and the metric ---------------------------------------------------------------

    def normalize(self, text: str, subtask: int = 0) -> str:
        return canonical(SLOTS[subtask], text)

    def slots_of(self, example: Example) -> list[str]:
        try:
            return [SLOT_OF_PROMPT[p] for p in example.prompts]
        except KeyError as e:
            raise ValueError(f"example {example.id!r}: prompt {e.args[0]!r} is not a MultiWOZ slot prompt") from None

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        """Joint goal accuracy (a turn counts only if all its slots are right), slot accuracy
        (over every turn x slot), and per domain the joint accuracy over the turns where that
        domain has a value in the reference or the prediction."""
        check_predictions(examples, predictions)
        turns_right, slots_right, slots_total = 0, 0, 0
        domain_right = dict.fromkeys(DOMAINS, 0)
        domain_turns = dict.fromkeys(DOMAINS, 0)
        for ex, pred in zip(examples, predictions):
            slots = self.slots_of(ex)
            right, active = {}, {}
            for slot, answer, refs in zip(slots, pred, references(ex)):
                p = canonical(slot, answer)
                gold = [canonical(slot, r) for r in refs] or [NONE]
                ok = p in gold
                slots_right += ok
                domain = slot.split("-")[0]
                right[domain] = right.get(domain, True) and ok
                active[domain] = active.get(domain, False) or p != NONE or any(g != NONE for g in gold)
            slots_total += len(slots)
            turns_right += all(right.values())
            for domain, ok in right.items():
                if active[domain]:
                    domain_turns[domain] += 1
                    domain_right[domain] += ok
        n = len(examples)
        metrics = {
            "joint_goal_accuracy": 100.0 * turns_right / n if n else 0.0,
            "slot_accuracy": 100.0 * slots_right / slots_total if slots_total else 0.0,
            "turns": n,
        }
        for domain in DOMAINS:
            if domain_turns[domain]:
                metrics[f"joint_goal_accuracy/{domain}"] = 100.0 * domain_right[domain] / domain_turns[domain]
                metrics[f"turns/{domain}"] = domain_turns[domain]
        return metrics


# -- the previous state and the last turns instead of the whole history (UniConv's input) -----


def serialize_state(values: list[str]) -> str:
    """The 30 slot values (in SLOTS order) as one line naming the filled slots only:
    `state: hotel area = north; hotel book stay = 3` (`state: none` when all are none)."""
    if len(values) != len(SLOTS):
        raise ValueError(f"a state has {len(SLOTS)} slot values, got {len(values)}")
    filled = [f"{p} = {v}" for p, slot, value in zip(PROMPTS, SLOTS, values) if (v := canonical(slot, value)) != NONE]
    return "state: " + ("; ".join(filled) if filled else NONE)


def state_document(previous: list[str], recent: str) -> str:
    """The document of the state form: the previous state's line, then the last utterances."""
    return f"{serialize_state(previous)}\n{recent}"


def recent_turns(document: str, n: int) -> str:
    """The utterances of the last n turns of a history (`history`'s lines): each user line and
    the system line before it."""
    lines = document.split("\n")
    users = [i for i, line in enumerate(lines) if line.startswith("user: ")]
    start = users[-n] if len(users) >= n else 0
    if start > 0 and lines[start - 1].startswith("system: "):
        start -= 1
    return "\n".join(lines[start:])


def dialogue_turn(example_id: str) -> tuple[str, int]:
    """`SNG01856:3` -> ("SNG01856", 3): the ids `turn_example` gives."""
    dialogue, sep, turn = example_id.rpartition(":")
    if not sep or not turn.isdigit():
        raise ValueError(f"example {example_id!r}: expected a MultiWOZ turn id DIALOGUE:TURN")
    return dialogue, int(turn)


class MultiWOZState(MultiWOZ):
    """MultiWOZ whose document is the previous dialogue state (`serialize_state`) followed by the
    last `last_turns` turns (system response + user utterance), as UniConv reads it, instead of
    the whole history. Training reads the gold previous state.

    Evaluation (`previous="predicted"`, the default and what `pidec eval` and the trainer's
    periodic evaluation run) is honest: the turns of each dialogue are decoded in order and turn
    t+1's document holds the state the model predicted at turn t, so a mistake carries on as it
    would in use. Dialogues are batched with each other, one round per turn index. The first
    turn of a dialogue given starts from the state its document holds (gold; none at turn 0).
    `previous="gold"` evaluates on the gold previous states instead: an oracle, higher than what
    the model does alone."""

    name = "multiwoz-state"
    description = (
        "MultiWOZ 2.1 state tracking from the previous state + the last turn; "
        "evaluated with the model's own predicted states chained turn by turn"
    )

    def __init__(self, last_turns: int = 1, previous: str = "predicted"):
        if isinstance(last_turns, bool) or not isinstance(last_turns, int) or last_turns < 1:
            raise ValueError(f"last_turns must be an integer >= 1, got {last_turns!r}")
        if previous not in ("predicted", "gold"):
            raise ValueError(f"previous must be 'predicted' or 'gold', got {previous!r}")
        self.last_turns, self.previous = last_turns, previous

    @property
    def chained(self) -> bool:
        return self.previous == "predicted"

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        examples = super().read(split, path, report)
        out, previous, current = [], [NONE] * len(SLOTS), None
        for ex in examples:
            dialogue, turn = dialogue_turn(ex.id)
            if dialogue != current or turn == 0:
                current, previous = dialogue, [NONE] * len(SLOTS)
            out.append(self.with_previous(ex, recent_turns(ex.document, self.last_turns), previous))
            previous = [s.target for s in ex.subtasks]
        return out

    def with_previous(self, example: Example, recent: str, previous: list[str]) -> TaskExample:
        """The turn `example` reading `recent` (its last utterances) and the `previous` state:
        here a state line before the utterances."""
        refs = getattr(example, "references", None)
        return TaskExample(example.id, state_document(previous, recent), example.subtasks, references=refs)

    def fit(self, examples, tokenizer, max_input_tokens, report):
        """The state line is kept; the utterances lose their oldest lines first (as `MultiWOZ.fit`
        does with a history) to make room for it; a state alone too long is cut at its end."""
        room = document_room(max_input_tokens)
        lengths = [
            len(ids) for ids in tokenizer([ex.document for ex in examples], add_special_tokens=False)["input_ids"]
        ]
        out = []
        for ex, n in zip(examples, lengths):
            if n <= room:
                out.append([ex])
                continue
            head, _, rest = ex.document.partition("\n")
            refs = getattr(ex, "references", None)
            left = room - len(tokenizer(head, add_special_tokens=False)["input_ids"]) - 1  # the newline may cost one
            if left < 1 or not rest:
                cut = cut_to_fit(head, token_spans(tokenizer, [head])[0], tokenizer, room, keep="start")
                report.changes["states cut at the end"] += 1
                report.truncated += 1
                out.append([TaskExample(ex.id, cut, ex.subtasks, references=refs)])
                continue
            (piece,) = MultiWOZ.fit(
                self, [TaskExample(ex.id, rest, ex.subtasks, references=refs)], tokenizer, left + 1, report
            )[0]
            out.append([TaskExample(ex.id, f"{head}\n{piece.document}", ex.subtasks, references=refs)])
        return out

    # -- chained evaluation (`pidec.evaluate.evaluate_chained` drives it) ------------------------

    def chain_rounds(self, examples: list[Example]) -> tuple[list[list[int]], list[str]]:
        """The examples by turn position (round r: the r-th turn of every dialogue), and each
        example's dialogue. A dialogue's turns must be consecutive and in order."""
        rounds: dict[int, list[int]] = {}
        dialogue_of, last = [], {}
        for i, ex in enumerate(examples):
            dialogue, turn = dialogue_turn(ex.id)
            if dialogue in last and turn != last[dialogue][0] + 1:
                raise ValueError(
                    f"example {ex.id!r}: the turns of dialogue {dialogue} must be consecutive and in order"
                )
            position = last[dialogue][1] + 1 if dialogue in last else 0
            last[dialogue] = (turn, position)
            dialogue_of.append(dialogue)
            rounds.setdefault(position, []).append(i)
        return [rounds[p] for p in sorted(rounds)], dialogue_of

    def chain_document(self, document: str, state: list[str]) -> str:
        """`document` with its state line replaced by `state` (the previous turn's answers)."""
        return state_document(state, document.split("\n", 1)[1])

    def chain_example(self, example: Example, state: list[str]) -> Example:
        """`example` as the next turn of a chain reads it: `state` (the previous turn's answers)
        in place of the gold previous state."""
        return replace_document(example, self.chain_document(example.document, state))

    def chain_state(self, example: Example, answers: list[str]) -> list[str]:
        return [canonical(slot, a) for slot, a in zip(self.slots_of(example), answers)]

    def unchained(self) -> MultiWOZState:
        """The same task reading documents as they are, to score one round."""
        return MultiWOZState(self.last_turns, previous="gold")


SLOT_PROMPT_SEPARATOR = CARRIED_SEPARATOR  # the trainer's `--downsample @unchanged` reads it


def slot_prompt(prompt: str, previous: str) -> str:
    """A slot's prompt carrying its previous value: `hotel name = wartworth`, `hotel area = none`."""
    return f"{prompt}{SLOT_PROMPT_SEPARATOR}{previous}"


class MultiWOZSlotState(MultiWOZState):
    """MultiWOZ whose previous state is in the prompts, not the document: each slot's prompt
    carries the value it had after the turn before (`hotel name = wartworth`, `taxi departure =
    none`), and the document is the last `last_turns` turns only. A slot's decoder row sees its
    own previous value a few positions back, where the state form's rows must find it in the
    encoder's state line through cross-attention; every row still reads the one shared encoding
    of the turn.

    Training reads the gold previous values; evaluation is chained as `MultiWOZState`'s is:
    each turn's prompts carry the values the model predicted at the turn before."""

    name = "multiwoz-slot-state"
    description = (
        "MultiWOZ 2.1 state tracking from the last turn, each slot's prompt carrying its previous "
        "value; evaluated with the model's own predicted values chained turn by turn"
    )

    def with_previous(self, example: Example, recent: str, previous: list[str]) -> TaskExample:
        """The turn `example` reading `recent` (its last utterances) as its document and the
        `previous` state in its prompts (`example`'s prompts may carry a value already)."""
        plain = [p.split(SLOT_PROMPT_SEPARATOR, 1)[0] for p in example.prompts]
        subtasks = [
            Subtask(slot_prompt(prompt, canonical(slot, value)), s.target)
            for prompt, slot, value, s in zip(plain, self.slots_of(example), previous, example.subtasks)
        ]
        return TaskExample(example.id, recent, subtasks, references=getattr(example, "references", None))

    def slots_of(self, example: Example) -> list[str]:
        out = []
        for p in example.prompts:
            slot = SLOT_OF_PROMPT.get(p.split(SLOT_PROMPT_SEPARATOR, 1)[0])
            if slot is None:
                raise ValueError(f"example {example.id!r}: prompt {p!r} is not a MultiWOZ slot prompt")
            out.append(slot)
        return out

    def fit(self, examples, tokenizer, max_input_tokens, report):
        """The document is utterances only: the oldest lines go first (`MultiWOZ.fit`)."""
        return MultiWOZ.fit(self, examples, tokenizer, max_input_tokens, report)

    def chain_example(self, example: Example, state: list[str]) -> Example:
        """`example` with each prompt's previous value replaced by `state`'s (the answers the
        model gave at the turn before)."""
        return self.with_previous(example, example.document, state)

    def unchained(self) -> MultiWOZSlotState:
        return MultiWOZSlotState(self.last_turns, previous="gold")
