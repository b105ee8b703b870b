"""The training loop: pid, pie and seq through one loop, in one process or several.

In `pid` each document is encoded once per step and all of its subtask rows are decoded against
one cross-attention computation (`RowGroups` folds a document's rows into its query axis), so a
step over K subtasks costs one encoder pass instead of K. The loss covers target tokens only:
the decoder start and the prompt are the row's prefix and never predicted.

Determinism is the design rule that makes resume exact: every random choice of the data (epoch
order, subtask sampling, batching) is a function of (seed, epoch), so the data position is just
(epoch, batch index); model, optimizer, scheduler and RNG states are saved with it in the run
folder (`run_folder`), and a resumed run logs the same losses, bit for bit, as one never
interrupted.

Data parallel: with several processes (`accelerate launch`/`torchrun`) every process builds the
same batch list; an optimizer step takes `processes x grad_accum` batches, process r computes
batches r, r + processes, ...; the loss of each is divided by the step's total target tokens
(known before the step runs), and gradients are summed across processes. One process with
`grad_accum = N` therefore takes the same steps as N processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .. import checkpoint, lora
from ..errors import InputError
from ..forcing import Part, collate, loss_sum
from ..layouts import TrainTokenizer
from .batching import epoch_batches
from .build import build_model, lr_lambda, make_optimizer
from .config import TrainConfig
from .evaluation import BestRule, evaluate_model
from .examples import (
    eval_task,
    load_eval_examples,
    load_pretrain_items,
    load_train_examples,
    longest_target,
    seq_omit,
    tokenize,
)
from .processes import Processes
from .progress import Progress
from .run_folder import (
    STATE,
    STATE_SUMMARY,
    RunFolder,
    UnreadableCheckpoint,
    load_run_config,
    read_state,
    rng_state,
    set_rng_state,
)


class TrainingDiverged(ValueError):
    """The loss or the gradients became NaN or infinite; no optimizer step was taken with them."""


class Trainer:
    """One run in one process (one of several under data parallelism): `set_up()`, then `run()`."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg.check().resolved()
        self.resuming = resume
        self.processes = Processes(self.cfg.device)
        self.main, self.rank, self.world = self.processes.main, self.processes.rank, self.processes.world
        self.device = self.processes.device
        self.folder = RunFolder(self.cfg.output)
        self.out = self.folder.path
        bf16 = self.cfg.precision == "bf16" or (
            self.cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.precision = "bf16" if bf16 else "fp32"
        self.step, self.epoch, self.position = 0, 0, 0
        self.best: dict | None = None
        self.notes: list[str] = []  # shown when the loop starts (checkpoints passed over on resume)
        self.passed_over: list[str] = []  # "checkpoint-N: why it is unreadable", newest first

    # -- set-up ------------------------------------------------------------------------------

    def set_up(self) -> None:
        """Build the model, read the data, plan the steps, and restore the latest checkpoint."""
        if self.main:
            self.folder.open(self.resuming)
        self.processes.barrier()
        self._build_model()
        self._read_data()
        if self.main and not self.resuming:  # only once the data has been read and checked
            self.folder.save_config(self.cfg)
        first, self.over_budget = epoch_batches(self.items, self.cfg, 0)
        self.steps_per_epoch = math.ceil(len(first) / (self.world * self.cfg.grad_accum))
        self.total_steps = self.cfg.steps or max(1, round(self.cfg.epochs * self.steps_per_epoch))
        self._epoch_cache = {0: first}
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg, self.total_steps))
        restored = self._restore_latest() if self.resuming else None
        if restored is None:
            torch.manual_seed(self.cfg.seed + self.rank)
        if self.main:
            self.folder.trim_log(self.step)
            self.folder.log(self._start_record(restored))

    def _start_record(self, restored: Path | None) -> dict:
        return {
            "type": "resume" if restored else "start",
            "step": self.step,
            "from": restored.name if restored else None,
            "passed_over": self.passed_over,
            "total_steps": self.total_steps,
            "processes": self.world,
            "precision": self.precision,
            "layout": self.cfg.layout,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "train_data": self.train_report.summary(),
            "eval_data": self.eval_report.summary() if self.eval_report else None,
            "best_metric": self.best_rule.describe() if self.best_rule else None,
            "examples_over_budget": self.over_budget,
            "carried_noise_rows": getattr(self, "noisy_rows", 0),
        }

    def _build_model(self) -> None:
        model, self.tokenizer, self.base_folder = build_model(self.cfg)
        if self.cfg.lora_r:
            model = self._add_lora(model)
        model.gradient_checkpointing = self.cfg.gradient_checkpointing
        self.model = model.to(self.device).train()

    def _add_lora(self, model):
        cfg = self.cfg
        if self.base_folder is None:  # from scratch: the frozen base must exist somewhere for export
            base_dir = self.out / "base"
            if self.main and not base_dir.exists():
                tmp = self.out / ".tmp-base"
                checkpoint.save(model, tmp, tokenizer=self.tokenizer)
                os.rename(tmp, base_dir)
            self.processes.barrier()
            self.base_folder = str(base_dir.resolve())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return lora.add_lora(model, cfg.lora_r, cfg.lora_alpha, list(cfg.lora_targets), cfg.lora_dropout)

    def _read_data(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        limit = self.model.config.max_input_length
        if cfg.objective == "span_corruption":
            self.items, self.train_report = load_pretrain_items(
                cfg, tok, limit, self.model.config.decoder_start_token_id
            )
            self.eval_examples, self.eval_report, self.task, self.best_rule = [], None, None, None
            return
        rows = TrainTokenizer(
            tok,
            cfg.layout,
            limit,
            self.model.config.decoder_start_token_id,
            cfg.truncate,
            cfg.seq_instruction,
            seq_omit(cfg),
            carried_noise=cfg.carried_noise > 0,
        )
        examples, self.train_report = load_train_examples(cfg, tok, limit)
        self.items = tokenize(examples, rows, self.train_report, cfg.on_bad)
        self.noisy_rows = sum(len(item.noisy) for item in self.items)
        if cfg.carried_noise and not self.noisy_rows:
            raise InputError(
                "--carried-noise: no training row carries a value (`prompt = value`) that its target "
                "repeats and its document mentions, so there is nothing to train with `none` carried"
            )
        self.eval_examples, self.eval_report = load_eval_examples(cfg, tok)
        self.task = eval_task(cfg)
        self.best_rule = None
        if self.eval_examples:
            self.best_rule = BestRule.for_task(self.task, cfg.best_metric, self.eval_examples)
            self.eval_budget = cfg.eval_max_new_tokens or longest_target(self.eval_examples, tok)

    def batches(self, epoch: int) -> list[list[Part]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.items, self.cfg, epoch)[0]}
        return self._epoch_cache[epoch]

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_model(self, folder: Path) -> None:
        if self.cfg.lora_r:
            lora.save_adapter(self.model, folder, self.base_folder)
            self.tokenizer.save_pretrained(str(folder))
        else:
            checkpoint.save(self.model, folder, tokenizer=self.tokenizer)

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "best": self.best,
            "processes": self.world,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.cfg.lora_r:
            state["lora"] = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        return state

    def save_checkpoint(self) -> None:
        if (self.out / f"checkpoint-{self.step}").exists():
            return
        tmp = self.out / f".tmp-checkpoint-{self.step}"
        if self.main:
            self.folder.begin_checkpoint(self.step)
        self.processes.barrier()
        torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.main:
            self._save_model(tmp)
            state = self._trainer_state()
            torch.save(state, tmp / STATE)
            summary = {k: state[k] for k in ("step", "epoch", "position", "best", "processes")}
            (tmp / STATE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        self.processes.barrier()
        if self.main:
            self.folder.finish_checkpoint(tmp, self.step, self.cfg.keep_checkpoints)
        self.processes.barrier()

    def _read_checkpoint(self, folder: Path) -> tuple[dict, dict]:
        """A checkpoint's trainer state and model weights, read in full before anything is changed."""
        state = read_state(folder)
        if state["processes"] != self.world:
            raise InputError(
                f"{folder} was written by {state['processes']} process(es); resume with the same number "
                f"(now {self.world}) so that the data order and the loss continue exactly"
            )
        if self.cfg.lora_r:
            weights = state.get("lora")
            if not isinstance(weights, dict) or not weights:
                raise UnreadableCheckpoint(f"{STATE} holds no LoRA weights")
            return state, weights
        try:
            restored = checkpoint.load_model(
                folder,
                dtype=torch.float32,
                dropout_rate=self.model.config.dropout_rate,
                max_input_length=self.model.config.max_input_length,
            )
        except Exception as e:  # a truncated or missing weights file: this checkpoint is unreadable
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UnreadableCheckpoint(f"the model does not load ({reason[:200]})") from None
        return state, restored.state_dict()

    def _restore_latest(self) -> Path | None:
        """Continue from the newest readable checkpoint; unreadable newer ones are named in
        `notes` and the log, and moved aside (never deleted). None: no checkpoint yet."""
        found, folder, passed = self.folder.latest_readable(self._read_checkpoint)
        if found is None:
            return None
        state, weights = found
        self.processes.barrier()  # every process has read before the main one renames anything
        self.passed_over = passed
        if passed:
            self.notes = [f"passed over {line}" for line in passed] + [f"resuming from {folder.name}"]
            if self.main:
                self.folder.set_aside([line.split(":", 1)[0] for line in passed])
        if self.cfg.lora_r:
            result = self.model.load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise InputError(f"{folder}: unexpected LoRA tensors {result.unexpected_keys[:3]}")
        else:
            self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position, self.best = (
            state["step"],
            state["epoch"],
            state["position"],
            state["best"],
        )
        set_rng_state(state["rng"][self.rank])
        return folder

    # -- steps ---------------------------------------------------------------------------------

    def _next_step_batches(self) -> list[list[Part]]:
        batches = self.batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        take = batches[self.position : self.position + self.world * self.cfg.grad_accum]
        self.position += len(take)
        return take

    def train_step(self) -> dict:
        """One optimizer step over this process's share of the step's batches."""
        collated = [collate(self.items, b, self.tokenizer.pad_token_id) for b in self._next_step_batches()]
        total_targets = sum(b.target_tokens for b in collated)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, docs, tokens, target tokens
        for batch in collated[self.rank :: self.world]:
            batch = batch.to(self.device)
            with self.autocast:
                loss = loss_sum(self.model, batch, self.cfg.label_smoothing)
            (loss / total_targets).backward()
            sums += torch.tensor([loss.item(), batch.docs, batch.tokens, batch.target_tokens], dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.processes.sum_gradients(params)
        sums = self.processes.sum(sums)
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not (math.isfinite(sums[0].item()) and math.isfinite(float(norm))):
            # stop before the step writes NaN into the weights: the last checkpoint stays usable
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: the loss or the gradient norm is not finite "
                f"(loss sum {sums[0].item()}, gradient norm {float(norm)}, precision {self.precision}); "
                "lower --lr or --position-lr-scale, or train with --precision fp32"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": sums[0].item() / max(sums[3].item(), 1),
            "lr": lr,
            "grad_norm": float(norm),
            "docs": int(sums[1]),
            "tokens": int(sums[2]),
            "target_tokens": int(sums[3]),
        }

    def run_eval(self, progress: Progress) -> dict | None:
        """Evaluate (main process), keep best/ by the best rule, log and show which one is best."""
        if not self.eval_examples:
            return None
        metrics = None
        if self.main:
            metrics = evaluate_model(
                self.model,
                self.tokenizer,
                self.task,
                self.eval_examples,
                self.cfg.layout,
                self.eval_budget,
                self.cfg.seq_instruction,
            )
            rule = self.best_rule
            better = rule.better(metrics, self.best)
            if better:
                self.best = rule.record(self.step, metrics)
                self.folder.save_named(
                    "best", self._save_model, {"step": self.step, "best_metric": rule.metric, **metrics}
                )
            self.folder.log({"type": "eval", "step": self.step, **metrics, "best": better, "best_metric": rule.metric})
            shown = [rule.metric, *rule.tie_breakers]
            progress.note(
                f"step {self.step} eval: "
                + ", ".join(f"{m} {metrics[m]:.2f}" for m in shown)
                + f"; best/ is step {self.best['step']} (by {rule.describe()})"
            )
        self.processes.barrier()
        self.best = self.processes.share(self.best)  # every process saves the same `best` with its state
        return metrics

    def run(self) -> dict:
        """Train to the last step, evaluating and saving on the way; returns a summary."""
        cfg = self.cfg
        progress = Progress(self.total_steps, self.step, cfg.progress, cfg.progress_every, enabled=self.main)
        for note in self.notes:
            progress.note(note)
        t_start, last_eval = time.perf_counter(), None
        end = min(self.total_steps, cfg.stop_after_step or self.total_steps)
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self.train_step()
                seconds = time.perf_counter() - t0
                rec |= {"type": "train", "step": self.step, "epoch": self.epoch, "seconds": round(seconds, 4)}
                rec["tokens_per_s"] = round(rec["tokens"] / max(seconds, 1e-9), 1)
                if self.main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    self.folder.log(rec)
                progress.step(self.step, rec["loss"], rec["lr"], rec["tokens"])
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    last_eval = self.run_eval(progress)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            progress.close()
        if self.step < self.total_steps:
            return self._pause(t_start)
        if self.eval_examples:
            last_eval = self.run_eval(progress)
        self.save_checkpoint()
        if self.main:
            self.folder.save_named("final", self._save_model)
            seconds = round(time.perf_counter() - t_start, 3)
            self.folder.log({"type": "end", "step": self.step, "seconds": seconds, "best": self.best})
        self.processes.barrier()
        return {
            "output": str(self.out),
            "steps": self.step,
            "eval": last_eval,
            "best": self.best,
            "final": str(self.out / "final"),
        }

    def _pause(self, t_start: float) -> dict:
        """Stop before the schedule's end (--stop-after-step): a checkpoint to resume from, no final/."""
        self.save_checkpoint()
        if self.main:
            seconds = round(time.perf_counter() - t_start, 3)
            self.folder.log({"type": "pause", "step": self.step, "seconds": seconds, "best": self.best})
        self.processes.barrier()
        return {
            "output": str(self.out),
            "steps": self.step,
            "total_steps": self.total_steps,
            "paused": True,
            "checkpoint": str(self.out / f"checkpoint-{self.step}"),
            "best": self.best,
            "resume": f"pidec {'pretrain' if self.cfg.objective == 'span_corruption' else 'train'} --resume {self.out}",
        }


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or, with resume=True, continue the run in cfg.output from its latest checkpoint)."""
    trainer = Trainer(cfg, resume=resume)
    trainer.set_up()
    return trainer.run()


def resume(folder: str | os.PathLike, **changes) -> dict:
    """Continue a run from its latest readable checkpoint with its saved settings."""
    cfg = load_run_config(folder)
    cfg.output = str(folder)
    cfg.stop_after_step = None  # a pause belongs to the command that asked for it, not to the run
    for k, v in changes.items():
        setattr(cfg, k, v)
    return train(cfg, resume=True)
