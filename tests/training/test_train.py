"""The trainer: loss masking, the pid loss against per-subtask losses and transformers,
token-budget batching, subtask sampling, exact resume after a kill, two processes against one,
LoRA train/merge/reload, and the checkpoints transformers loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from pidec import checkpoint
from pidec.data import Example, Subtask, write_jsonl
from pidec.errors import InputError
from pidec.forcing import IGNORE, Part, collate, loss_sum, padded_tokens, target_logits
from pidec.layouts import TrainTokenizer, carried_value, noisy_prompts
from pidec.model import T5, T5Config
from pidec.training.batching import epoch_batches, select_rows
from pidec.training.build import lr_lambda, make_optimizer
from pidec.training.config import TASK_ONLY, TrainConfig
from pidec.training.run_folder import recover

ROOT = Path(__file__).resolve().parents[2]
TOK = ByT5Tokenizer()
COLORS = ["red", "blue", "green", "black", "white", "grey"]
CITIES = ["paris", "rome", "oslo", "lima", "kyiv", "bern"]


def tiny_model(seed: int = 0, **kw) -> T5:
    cfg = {
        "vocab_size": 384,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "dropout_rate": 0.0,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20,
    }
    cfg.update(kw)
    return T5(T5Config(**cfg)).init_weights(torch.Generator().manual_seed(seed))


def car_examples(n: int, seed: int = 0) -> list[Example]:
    import random

    r = random.Random(seed)
    out = []
    for i in range(n):
        c, t = r.choice(COLORS), r.choice(CITIES)
        doc = f"I want a {c} car in {t}" + " please" * r.randint(0, 3) + "."
        subtasks = [Subtask("color", c), Subtask("city", t), Subtask("day", "none"), Subtask("size", "none")]
        out.append(Example(f"{seed}-{i}", doc, subtasks))
    return out


def items_for(layout: str, examples: list[Example]):
    coder = TrainTokenizer(TOK, layout, 512, 0)
    return [coder.item(i, ex.document, ex.prompts, ex.targets) for i, ex in enumerate(examples)]


# -- loss -------------------------------------------------------------------------------------


def test_labels_cover_targets_only():
    ex = car_examples(1)[0]
    items = items_for("pid", [ex])
    batch = collate(items, [Part.of(items, 0, [0, 1, 2, 3])], pad=0)
    for r, s in enumerate(ex.subtasks):
        prompt = TOK(s.prompt, add_special_tokens=False)["input_ids"]
        target = TOK(s.target, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
        labels = batch.labels[r].tolist()
        # positions 0..len(prompt)-1 predict prompt tokens: never in the loss
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) : len(prompt) + len(target)] == target
        assert all(x == IGNORE for x in labels[len(prompt) + len(target) :])
        # the decoder input is start + prompt + target without its last token
        assert batch.decoder_input_ids[r, : len(prompt) + len(target)].tolist() == [0] + prompt + target[:-1]
    assert batch.target_tokens == sum(len(s.target) + 1 for s in ex.subtasks)


def test_prompt_tokens_do_not_change_the_loss_target_tokens_do():
    """Swapping what a prompt position would predict is invisible to the loss; a target is not."""
    torch.manual_seed(0)
    model = tiny_model()
    ex = car_examples(1)[0]
    items = items_for("pid", [ex])
    batch = collate(items, [Part.of(items, 0, [0, 1])], pad=0)
    base = loss_sum(model, batch)
    # move the labels' prefix region: still IGNORE -> same loss
    assert (batch.labels[:, :3] == IGNORE).all()
    changed = collate(items, [Part.of(items, 0, [0, 1])], pad=0)
    changed.labels[0, 6] = (changed.labels[0, 6] + 1) % 384  # a target token
    assert not torch.allclose(base, loss_sum(model, changed))


@pytest.mark.parametrize("layout", ["pid", "pie"])
def test_loss_is_the_sum_of_per_subtask_losses(layout):
    model = tiny_model(1)
    examples = car_examples(3, seed=1)
    items = items_for(layout, examples)
    together = loss_sum(model, collate(items, [Part.of(items, i, [0, 1, 2, 3]) for i in range(3)], pad=0))
    alone = sum(loss_sum(model, collate(items, [Part.of(items, i, [j])], pad=0)) for i in range(3) for j in range(4))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["pid", "pie", "seq"])
def test_loss_matches_transformers(layout, tmp_path):
    """Our summed loss equals the cross-entropy transformers' T5 gives for the same rows."""
    from transformers import T5ForConditionalGeneration

    model = tiny_model(2)
    checkpoint.save(model, tmp_path)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    examples = car_examples(2, seed=2)
    items = items_for(layout, examples)
    rows = [0] if layout == "seq" else [0, 1, 2, 3]
    batch = collate(items, [Part.of(items, i, rows) for i in range(2)], pad=0)
    ours = loss_sum(model, batch)
    enc = batch.input_ids[batch.row_doc]
    mask = batch.attention_mask[batch.row_doc]
    logits = hf(input_ids=enc, attention_mask=mask, decoder_input_ids=batch.decoder_input_ids).logits
    theirs = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_label_smoothing_mixes_the_gold_token_with_the_uniform_distribution():
    """`--label-smoothing e`: each target token's loss is (1 - e) x its cross-entropy plus e x the
    mean cross-entropy over the whole vocabulary; 0 is the plain loss."""
    model = tiny_model(3)
    items = items_for("pid", car_examples(2, seed=3))
    batch = collate(items, [Part.of(items, i, [0, 1, 2, 3]) for i in range(2)], pad=0)
    with torch.no_grad():
        plain = loss_sum(model, batch)
        smoothed = loss_sum(model, batch, 0.1)
        torch.testing.assert_close(loss_sum(model, batch, 0.0), plain)
        logits, labels = target_logits(model, batch)
        logp = torch.log_softmax(logits.float(), -1)
    gold = -logp.gather(1, labels[:, None]).sum()
    uniform = -logp.mean(-1).sum()
    torch.testing.assert_close(plain, gold, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(smoothed, 0.9 * gold + 0.1 * uniform, rtol=1e-4, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    examples = car_examples(2)
    items = items_for("pid", examples)
    batch = collate(items, [Part.of(items, i, [0, 1, 2, 3]) for i in range(2)], pad=0)
    grads = []
    for flag in (False, True):
        model = tiny_model(3).train()
        model.gradient_checkpointing = flag
        loss_sum(model, batch).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


# -- batching and sampling --------------------------------------------------------------------


def test_token_budget_batching():
    examples = car_examples(120, seed=3)
    items = items_for("pid", examples)
    cfg = TrainConfig(output="x", batch_tokens=600)
    batches, alone = epoch_batches(items, cfg, 0)
    assert alone == 0
    for b in batches:
        assert padded_tokens(b) <= 600
    seen = sorted(p.item for b in batches for p in b)
    assert seen == list(range(120))  # every example once per epoch
    again, _ = epoch_batches(items, cfg, 0)
    assert [[p.item for p in b] for b in again] == [[p.item for p in b] for b in batches]
    other, _ = epoch_batches(items, cfg, 1)
    assert [[p.item for p in b] for b in other] != [[p.item for p in b] for b in batches]
    # a budget below one example: each example is a batch of its own, counted
    tiny, alone = epoch_batches(items, TrainConfig(output="x", batch_tokens=10), 0)
    assert len(tiny) == 120 and alone == 120


def test_padded_tokens_counts_encoder_and_decoder_padding():
    parts = [Part(0, [0, 1], enc_len=10, enc_rows=1, dec_len=5), Part(1, [0], enc_len=20, enc_rows=1, dec_len=8)]
    assert padded_tokens(parts) == 2 * 20 + 3 * 8


def test_subtask_sampling_and_downsampling():
    examples = car_examples(400, seed=4)
    items = items_for("pid", examples)
    cfg = TrainConfig(output="x", max_subtasks=2, downsample={"none": 0.25})
    kept = [select_rows(it, cfg, 0) for it in items]
    assert all(1 <= len(k) <= 2 for k in kept)
    none_share = sum(items[i].values[j] == "none" for i, k in enumerate(kept) for j in k) / sum(map(len, kept))
    assert none_share < 0.3  # half the targets are "none" before down-sampling
    assert kept == [select_rows(it, cfg, 0) for it in items]  # seeded by (seed, epoch, example)
    assert kept != [select_rows(it, cfg, 1) for it in items]
    with pytest.raises(ValueError, match="seq"):
        TrainConfig(output="x", layout="seq", train="f", size="tiny", tokenizer="byte", steps=1, max_subtasks=2).check()


def test_downsampling_the_rows_that_repeat_their_prompts_value():
    """`@unchanged:P` keeps a fraction P of the rows whose target repeats the value their prompt
    carries (`slot = value`, as multiwoz-slot-state writes it); other rows keep their value's rule."""
    prompts = ["hotel area = north", "hotel day = none", "hotel name = none", "taxi leave at", "hotel stars = 4"]
    targets = ["north", "friday", "none", "none", "4"]
    for layout in ("pid", "pie"):
        tok = TrainTokenizer(TOK, layout, 512, 0)
        items = [tok.item(i, f"document {i}", prompts, targets) for i in range(400)]
        assert items[0].carried == ["north", "none", "none", None, "4"]
        cfg = TrainConfig(output="x", downsample={"@unchanged": 0.0, "none": 0.5})
        kept = [select_rows(it, cfg, 0) for it in items]
        # rows 0, 2 and 4 repeat their value: never kept; row 1 changed: always; row 3 (no carried
        # value, target none): the none rule, about half the time
        assert {j for k in kept for j in k} == {1, 3}
        assert all(1 in k for k in kept)
        assert 0.4 < sum(3 in k for k in kept) / len(kept) < 0.6
        half = TrainConfig(output="x", downsample={"@unchanged": 0.5})
        share = sum(j in (0, 2, 4) for it in items for j in select_rows(it, half, 0)) / (3 * len(items))
        assert 0.43 < share < 0.57
    # a case difference or surrounding space still counts as the same value; no separator: no value
    assert carried_value("hotel area = North ") == "North " and carried_value("area=north") is None
    assert carried_value(" = north") is None


def test_carried_noise_trains_rows_with_none_carried_where_the_document_holds_the_value():
    """`--carried-noise P`: a row whose prompt carries a value that its target repeats and its
    document mentions trains, with probability P an epoch, with `none` carried and the same
    target; every other row is never changed."""
    prompts = [
        "hotel area = north",
        "hotel day = none",
        "hotel name = acorn guest house",
        "taxi leave at",
        "hotel stars = 4",
    ]
    targets = ["north", "friday", "acorn guest house", "none", "5"]
    document = "system: the Acorn Guest House is in the north .\nuser: great , book it for friday ."
    # row 0: north repeated and mentioned; row 2: mentioned in another case; row 4: changed (4 -> 5)
    assert noisy_prompts(document, prompts, targets) == {0: "hotel area = none", 2: "hotel name = none"}
    assert noisy_prompts("the northern part", prompts[:1], targets[:1]) == {}  # whole words only
    assert noisy_prompts("north", ["hotel area = none"], ["none"]) == {}
    for layout in ("pid", "pie"):
        plain = TrainTokenizer(TOK, layout, 512, 0).item(0, document, prompts, targets)
        tok = TrainTokenizer(TOK, layout, 512, 0, carried_noise=True)
        item = tok.item(0, document, prompts, targets)
        assert item.real_rows == 5 and item.noisy == {0: 5, 2: 6} and len(item.rows) == 7
        assert item.rows[:5] == plain.rows and item.values[5:] == ["north", "acorn guest house"]
        assert item.rows[5][2] == item.rows[0][2] and item.rows[6][2] == item.rows[2][2]  # the same targets
        if layout == "pid":
            assert item.rows[5][1] == [0] + tok.ids("hotel area = none")
        else:  # pie: the noisy prompt is an encoder row of its own
            assert item.rows[5][0] == 5 and item.enc[5] == tok.encode(f"hotel area = none {document}") + [
                TOK.eos_token_id
            ]
        items = [tok.item(i, document, prompts, targets) for i in range(400)]
        cfg = TrainConfig(output="x", carried_noise=0.25)
        chosen = [select_rows(it, cfg, 0) for it in items]
        assert all(len(k) == 5 and {1, 3, 4} <= set(k) for k in chosen)  # every row, some swapped
        assert all((0 in k) != (5 in k) and (2 in k) != (6 in k) for k in chosen)
        share = sum(5 in k for k in chosen) / len(chosen)
        assert 0.18 < share < 0.32
        assert chosen == [select_rows(it, cfg, 0) for it in items]  # seeded: a resume rebuilds them
        assert [select_rows(it, TrainConfig(output="x"), 0) for it in items[:3]] == [[0, 1, 2, 3, 4]] * 3
        # with down-sampling, a row sampled out stays out whichever prompt it would have carried
        both = TrainConfig(output="x", carried_noise=0.5, downsample={"@unchanged": 0.0})
        assert {j for it in items for j in select_rows(it, both, 0)} == {1, 3, 4}
    with pytest.raises(InputError, match="--carried-noise: must be in"):
        TrainConfig(output="x", train="t.jsonl", size="tiny", tokenizer="byte", steps=1, carried_noise=1.0).check()
    with pytest.raises(InputError, match="seq reads no prompts"):
        TrainConfig(
            output="x", train="t.jsonl", size="tiny", tokenizer="byte", steps=1, layout="seq", carried_noise=0.2
        ).check()


def test_schedules():
    cfg = TrainConfig(output="x", warmup_steps=10, schedule="linear")
    f = lr_lambda(cfg, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    cos = lr_lambda(TrainConfig(output="x", schedule="cosine", warmup_steps=0), 100)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert lr_lambda(TrainConfig(output="x", schedule="constant", warmup_steps=0), 100)(99) == 1.0
    auto = lr_lambda(TrainConfig(output="x", schedule="constant"), 100)  # no --warmup-steps: 4% of the steps
    assert auto(0) == pytest.approx(0.25) and auto(3) == 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_position_biases_get_their_own_learning_rate(optimizer):
    model = tiny_model()
    cfg = TrainConfig(output="x", lr=1e-3, position_lr_scale=30.0, optimizer=optimizer, weight_decay=0.1)
    opt = make_optimizer(cfg, model)
    position = {id(model.encoder.rel_bias.weight), id(model.decoder.rel_bias.weight)}
    seen = set()
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        seen |= ids
        if ids & position:
            assert ids == position and g["lr"] == pytest.approx(0.03) and g["weight_decay"] == 0.0
        else:
            assert g["lr"] == pytest.approx(1e-3)
    assert seen == {id(p) for p in model.parameters()}  # every parameter once
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TrainConfig(output="x", warmup_steps=2), 10))
    assert sorted(scheduler.get_last_lr()) == pytest.approx(sorted(g["lr"] for g in opt.param_groups))
    assert min(scheduler.get_last_lr()) == pytest.approx(0.5e-3)  # warm-up scales every group


def test_position_init_std():
    std = tiny_model().encoder.rel_bias.weight.std().item()
    assert std == pytest.approx(32**-0.5, rel=0.35)  # T5's d_model**-0.5
    model = T5(tiny_model().config).init_weights(torch.Generator().manual_seed(0), position_std=2.0)
    assert model.decoder.rel_bias.weight.std().item() == pytest.approx(2.0, rel=0.35)
    with pytest.raises(InputError, match="--position-lr-scale"):
        TrainConfig(output="x", train="t.jsonl", size="tiny", tokenizer="byte", steps=1, position_lr_scale=0).check()


def test_recover_after_a_kill_inside_a_save(tmp_path):
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    (tmp_path / ".old-best").mkdir()  # killed between moving best aside and renaming the new one
    (tmp_path / ".old-final").mkdir()
    (tmp_path / "final").mkdir()
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]


# -- whole runs -------------------------------------------------------------------------------


def write_data(folder: Path, train: int = 96, test: int = 12) -> tuple[Path, Path]:
    write_jsonl(car_examples(train, seed=5), folder / "train.jsonl")
    write_jsonl(car_examples(test, seed=6), folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


def run_args(train: Path, evalf: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--train",
        str(train),
        "--eval",
        str(evalf),
        "--size",
        "tiny",
        "--tokenizer",
        "byte",
        "--batch-tokens",
        "1024",
        "--lr",
        "3e-3",
        "--seed",
        "1",
        *extra,
    ]


def pidec(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pidec", *args], check=False, capture_output=True, text=True, cwd=ROOT, env=env, **kw
    )


def kill_after_steps(args, output: Path, steps: int, timeout_s: float = 120) -> None:
    """Run `pidec *args --output output` and SIGKILL it once its log holds `steps` training
    steps (or after `timeout_s`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pidec", *args, "--output", str(output)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        log = output / "log.jsonl"
        if log.exists() and log.read_text().count('"train"') >= steps:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def train_losses(folder: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]


def test_resume_after_kill_continues_exactly(tmp_path):
    train, evalf = write_data(tmp_path)
    common = run_args(train, evalf, "--steps", "16", "--save-every", "3", "--eval-every", "8", "--dropout", "0.1")
    done = pidec(*common, "--output", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    # off a terminal: plain progress lines (no bar), the evaluations and which step best/ is
    assert "\r" not in done.stderr and "step 1/16  loss " in done.stderr and "step 16/16  loss " in done.stderr
    assert "step 8 eval: exact_match " in done.stderr and "best/ is step " in done.stderr
    whole = train_losses(tmp_path / "whole")
    assert [s for s, _ in whole] == list(range(1, 17))

    killed = tmp_path / "killed"
    kill_after_steps(common, killed, 7)  # a few steps and at least one checkpoint behind it
    assert len(train_losses(killed)) < 16
    resumed = pidec("train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(killed) == whole  # bit-identical losses, every step once
    evals = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [8, 16]


def test_carried_noise_end_to_end_and_data_without_carried_values(tmp_path):
    """A run with --carried-noise logs how many rows it can swap; on data whose prompts carry no
    value it stops before training with a message that says why."""
    carried = [
        Example(
            str(i),
            f"user: a table in the {area} for {n} people",
            [Subtask(f"area = {area if i % 2 else 'none'}", area), Subtask(f"people = {n}", str(n))],
        )
        for i, (area, n) in enumerate((a, n) for a in ("north", "south", "east") for n in range(2, 8))
    ]
    write_jsonl(carried, tmp_path / "carried.jsonl")
    args = ["train", "--train", str(tmp_path / "carried.jsonl"), "--size", "tiny", "--tokenizer", "byte"]
    args += ["--batch-tokens", "1024", "--steps", "2", "--carried-noise", "0.5"]
    done = pidec(*args, "--output", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["type"] == "start" and start["carried_noise_rows"] == 18 + 9  # every people row, odd area rows
    train, _ = write_data(tmp_path)
    bad = pidec(*args[:2], str(train), *args[3:], "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--carried-noise: no training row carries a value" in bad.stderr, bad.stderr


def test_checkpoint_loads_in_transformers_and_pidec(tmp_path):
    from transformers import T5ForConditionalGeneration

    import pidec as lib

    train, evalf = write_data(tmp_path, train=48, test=6)
    out = tmp_path / "run"
    done = pidec(*run_args(train, evalf, "--steps", "3", "--dropout", "0", "--output", str(out)))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 3 and "example_exact_match" in summary["eval"]
    for name in ("final", "best", "checkpoint-3"):
        hf = T5ForConditionalGeneration.from_pretrained(out / name).eval()
        ours = checkpoint.load_model(out / name)
        ids = torch.tensor([[5, 6, 7, 1]])
        dec = torch.tensor([[0, 9, 10]])
        torch.testing.assert_close(
            ours(ids, dec), hf(input_ids=ids, decoder_input_ids=dec).logits, rtol=1e-4, atol=1e-4
        )
    model = lib.load(out / "final")
    assert len(model.generate("I want a red car in rome.", ["color", "city"], max_new_tokens=4)) == 2
    # one scale: the run's evaluation is what `pidec eval` (evaluate.evaluate) gives best/, in percent
    from pidec import tasks
    from pidec.data import read_jsonl
    from pidec.evaluate import evaluate
    from pidec.training.examples import longest_target

    chosen = json.loads((out / "best" / "metrics.json").read_text())
    assert chosen["best_metric"] == "exact_match" and summary["best"]["metric"] == "exact_match"
    examples = read_jsonl(evalf)
    best = lib.load(out / "best", pack_weights=False)  # as the trainer decodes: plain linear layers
    again = evaluate(best, tasks.get("jsonl"), examples, max_new_tokens=longest_target(examples, TOK))
    for key in ("exact_match", "example_exact_match"):
        assert summary["eval"][key] == again.metrics[key]
    assert summary["eval"]["subtasks"] == 24


def test_tie_embeddings_trains_a_t5_v1_0_head_that_transformers_loads(tmp_path):
    """--tie-embeddings: the output layer is the embedding matrix and the decoder outputs are scaled
    as T5 v1.0 scales them; the checkpoint says so and transformers gives the same logits."""
    from transformers import T5ForConditionalGeneration

    train, evalf = write_data(tmp_path, train=24, test=4)
    out = tmp_path / "run"
    done = pidec(*run_args(train, evalf, "--steps", "2", "--tie-embeddings", "--output", str(out)))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    ours = checkpoint.load_model(out / "final")
    assert ours.lm_head is None and ours.config.scale_decoder_outputs
    hf = T5ForConditionalGeneration.from_pretrained(out / "final").eval()
    ids, dec = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 9, 10]])
    torch.testing.assert_close(ours(ids, dec), hf(input_ids=ids, decoder_input_ids=dec).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="--tie-embeddings: sets the output layer of a model built from scratch"):
        TrainConfig(output="x", train="t", model="m", steps=1, tie_embeddings=True).check()


def test_two_processes_match_one(tmp_path):
    train, evalf = write_data(tmp_path, train=64, test=4)
    common = run_args(train, evalf, "--steps", "4", "--dropout", "0", "--batch-tokens", "700")
    one = pidec(*common, "--grad-accum", "2", "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "pidec",
            *common,
            "--output",
            str(tmp_path / "two"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    start = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    # the weights after 4 steps agree too
    wa = checkpoint.load_model(tmp_path / "one" / "final").state_dict()
    wb = checkpoint.load_model(tmp_path / "two" / "final").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_lora_train_merge_reload(tmp_path):
    import pidec as lib

    train, evalf = write_data(tmp_path, train=48, test=6)
    out = tmp_path / "lora"
    done = pidec(
        *run_args(
            train,
            evalf,
            "--steps",
            "4",
            "--dropout",
            "0",
            "--lora-r",
            "4",
            "--lora-targets",
            "q,v",
            "--lr",
            "1e-2",
            "--output",
            str(out),
        )
    )
    assert done.returncode == 0, done.stderr
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert 0 < start["trainable"] < start["parameters"] / 5
    assert (out / "final" / "adapter_config.json").is_file()
    base = checkpoint.load_model(out / "base").state_dict()
    merged_dir = tmp_path / "merged"
    exp = pidec("export", "--checkpoint", str(out / "final"), "--out", str(merged_dir), "--merge-lora")
    assert exp.returncode == 0, exp.stderr
    merged = checkpoint.load_model(merged_dir).state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed)
    doc, prompts = "I want a blue car in oslo.", ["color", "city", "day"]
    adapted = lib.load(out / "final").generate(doc, prompts, max_new_tokens=5)
    assert lib.load(merged_dir).generate(doc, prompts, max_new_tokens=5) == adapted
    # an adapter must be merged to export
    refused = pidec("export", "--checkpoint", str(out / "final"), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "merge-lora" in refused.stderr


def test_a_non_finite_loss_stops_training_before_the_weights_are_touched(tmp_path):
    train, evalf = write_data(tmp_path, train=16, test=4)
    model = tiny_model(vocab_size=384)
    model.config.max_input_length = 512
    with torch.no_grad():
        # finite weights (a NaN or Inf weight is refused when loading) whose logits overflow:
        # one of the two rows gives +inf at every position, so the loss is not finite
        model.lm_head.weight[5] = torch.finfo(torch.float32).max
        model.lm_head.weight[6] = -torch.finfo(torch.float32).max
    checkpoint.save(model, tmp_path / "bad")
    TOK.save_pretrained(tmp_path / "bad")
    run = pidec(
        "train",
        "--train",
        str(train),
        "--model",
        str(tmp_path / "bad"),
        "--output",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--batch-tokens",
        "1024",
    )
    assert run.returncode != 0
    assert "training diverged at step 1" in run.stderr and "--precision fp32" in run.stderr
    assert "Traceback" not in run.stderr
    steps = (
        [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"train"' in x]
        if (tmp_path / "run" / "log.jsonl").exists()
        else []
    )
    assert steps == []  # no step was taken, none logged


# -- the run folder on resume: safe formats, unreadable checkpoints ------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6, and its losses."""
    from typer.testing import CliRunner

    from pidec.cli import app

    folder = tmp_path_factory.mktemp("saved")
    train, evalf = write_data(folder, train=32, test=4)
    args = run_args(train, evalf, "--steps", "6", "--save-every", "2", "--keep-checkpoints", "5", "--dropout", "0.1")
    r = CliRunner().invoke(app, [*args, "--output", str(folder / "run")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert sorted(p.name for p in (folder / "run").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    return folder / "run", train_losses(folder / "run")


def resume_in_process(folder: Path):
    from typer.testing import CliRunner

    from pidec.cli import app

    return CliRunner().invoke(app, ["train", "--resume", str(folder)])


class Planted:
    """Unpickling this creates a file: a stand-in for code planted in a run folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_trainer_state_and_rng_files_load_without_unpickling_objects(saved_run):
    folder, _ = saved_run
    for name in ("trainer_state.pt", "rng-0.pt"):
        value = torch.load(folder / "checkpoint-6" / name, weights_only=True)
        assert isinstance(value, dict)


@pytest.mark.parametrize("damage", ["planted", "empty", "truncated", "no rng"])
def test_an_unreadable_only_checkpoint_is_a_one_line_error(saved_run, tmp_path, damage):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run[0], folder)
    for step in (2, 4):
        shutil.rmtree(folder / f"checkpoint-{step}")
    ckpt, marker = folder / "checkpoint-6", tmp_path / "planted-code-ran"
    state = ckpt / "trainer_state.pt"
    if damage == "planted":
        torch.save({"step": Planted(marker)}, state)
        torch.save({"torch": Planted(marker)}, ckpt / "rng-0.pt")
    elif damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        (ckpt / "rng-0.pt").unlink()
    r = resume_in_process(folder)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume {folder}: no readable checkpoint (checkpoint-6: ")
    expect = {"planted": "does not load as tensors", "empty": "trainer_state.pt is empty"}
    expect |= {"truncated": "trainer_state.pt does not load", "no rng": "rng-0.pt is missing"}
    assert expect[damage] in lines[0]
    assert not marker.exists()  # the planted pickle did nothing
    assert ckpt.is_dir()  # and nothing was moved or deleted


def test_resume_passes_over_unreadable_checkpoints_and_stays_exact(saved_run, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run[0], folder)
    state = folder / "checkpoint-6" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    (folder / "checkpoint-4" / "rng-0.pt").unlink()
    r = resume_in_process(folder)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "passed over checkpoint-6: trainer_state.pt does not load" in r.stderr
    assert "passed over checkpoint-4: rng-0.pt is missing" in r.stderr and "resuming from checkpoint-2" in r.stderr
    assert train_losses(folder) == saved_run[1]  # steps 3-6 again, bit for bit
    assert (folder / "unreadable-checkpoint-6").is_dir() and (folder / "unreadable-checkpoint-4").is_dir()
    assert (folder / "checkpoint-6").is_dir()  # written again by the resumed run
    resumed = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resumed[-1]["from"] == "checkpoint-2" and len(resumed[-1]["passed_over"]) == 2


def test_a_run_in_pieces_pauses_at_stop_after_step_and_resumes_exactly(saved_run, tmp_path):
    """--stop-after-step N pauses the schedule of --steps at N (checkpoint-N, no final/); --resume
    goes on to the next pause or the end, and the pieces train what one run trains, bit for bit."""
    from typer.testing import CliRunner

    from pidec.cli import app

    train, evalf = write_data(tmp_path, train=32, test=4)
    args = run_args(train, evalf, "--steps", "6", "--save-every", "2", "--keep-checkpoints", "5", "--dropout", "0.1")
    folder = tmp_path / "run"
    first = CliRunner().invoke(app, [*args, "--output", str(folder), "--stop-after-step", "3"])
    assert first.exit_code == 0, (first.output, first.exception)
    result = json.loads(first.stdout)
    assert result["paused"] and result["steps"] == 3 and result["total_steps"] == 6
    assert result["resume"] == f"pidec train --resume {folder}" and result["checkpoint"] == str(folder / "checkpoint-3")
    assert (folder / "checkpoint-3").is_dir() and not (folder / "final").exists()
    assert [s for s, _ in train_losses(folder)] == [1, 2, 3]
    assert json.loads((folder / "log.jsonl").read_text().splitlines()[-1])["type"] == "pause"

    other = CliRunner().invoke(app, ["train", "--resume", str(folder), "--lr", "1e-3"])
    assert other.exit_code == 2 and "drop --lr" in other.stderr  # only how far this piece goes may change
    second = CliRunner().invoke(app, ["train", "--resume", str(folder), "--stop-after-step", "5"])
    assert second.exit_code == 0, (second.output, second.exception)
    assert json.loads(second.stdout)["steps"] == 5 and not (folder / "final").exists()
    last = CliRunner().invoke(app, ["train", "--resume", str(folder)])  # the saved pause is not repeated
    assert last.exit_code == 0, (last.output, last.exception)
    assert "paused" not in json.loads(last.stdout) and (folder / "final").is_dir()
    assert train_losses(folder) == saved_run[1]  # the three pieces are the 6-step run, bit for bit


def test_stop_after_step_must_be_a_positive_step():
    from pidec.errors import InputError
    from pidec.training.config import TrainConfig

    with pytest.raises(InputError, match="--stop-after-step: must be an integer >= 1, got 0"):
        TrainConfig(output="x", task="booking", size="tiny", tokenizer="byte", steps=4, stop_after_step=0).check()


# -- settings: defaults from scratch, declared once for the CLI ------------------------------


def test_from_scratch_defaults_are_the_measured_ones():
    from pidec.training.build import scratch_config

    cfg = TrainConfig(output="x", train="t", size="tiny", tokenizer="byte", steps=1).check().resolved()
    assert (cfg.lr, cfg.position_lr_scale, cfg.position_init_std) == (2e-3, 100.0, 1.0)
    shape = scratch_config(cfg, TOK)
    assert (shape.num_heads, shape.d_kv) == (8, 16)
    assert not shape.tie_word_embeddings and not shape.scale_decoder_outputs  # T5 v1.1: a head of its own
    wide = TrainConfig(output="x", train="t", size="tiny", tokenizer="byte", steps=1, num_heads=2, d_kv=64).resolved()
    assert (scratch_config(wide, TOK).num_heads, scratch_config(wide, TOK).d_kv) == (2, 64)
    tuned = TrainConfig(output="x", train="t", model="m", steps=1).check().resolved()
    assert (tuned.lr, tuned.position_lr_scale, tuned.position_init_std) == (3e-4, 1.0, None)
    with pytest.raises(InputError, match="--num-heads: sets the shape of a model built from scratch"):
        TrainConfig(output="x", train="t", model="m", steps=1, num_heads=8).check()


def test_train_and_compare_options_come_from_the_config():
    import dataclasses

    import typer.main

    from pidec.cli import app
    from pidec.training.compare import COMPARE_DEFAULTS, COMPARE_TRAIN_FIELDS

    commands = {c.name: typer.main.get_command(app).commands[c.name] for c in app.registered_commands if c.name}
    train_opts = {p.name: p for p in commands["train"].params}
    declared = [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]
    pretraining = {f.name for f in declared if f.metadata["panel"] == "Pre-training"}
    assert pretraining == {"text", "text_field", "noise_density", "mean_span_length"}
    assert set(train_opts) == {f.name for f in declared} - pretraining | {"resume"}
    for f in declared:
        if f.name not in pretraining:
            assert train_opts[f.name].rich_help_panel == f.metadata["panel"]
    pretrain_opts = {p.name: p for p in commands["pretrain"].params}  # pretrain: no subtask settings
    assert set(pretrain_opts) == {f.name for f in declared} - set(TASK_ONLY) | {"resume"}
    compare_opts = {p.name: p for p in commands["compare"].params}
    for name in COMPARE_TRAIN_FIELDS:  # the same defaults in both commands, unless declared otherwise
        want = COMPARE_DEFAULTS.get(name, train_opts[name].default)
        assert compare_opts[name].default == want, name
    assert compare_opts["lr"].default is None and compare_opts["schedule"].default == "cosine"
