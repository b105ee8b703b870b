"""`pidec train` and `pidec compare`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..checkpoint import CheckpointError
from ..data import DataError
from ..training import loop as training
from ..training.compare import format_results, parse_layouts, run_comparison
from .common import app, fail


@app.command()
def train(
    ctx: typer.Context,
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="run folder: checkpoints, best/, final/, log.jsonl"
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="continue the run in this folder from its last checkpoint"
    ),
    layout: str = typer.Option("pid", "--layout", help="pid | pie | seq"),
    train_file: Optional[str] = typer.Option(None, "--train", help="training JSONL"),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="evaluation JSONL"),
    task: Optional[str] = typer.Option(None, "--task", help="a registered task instead of --train/--eval"),
    data: Optional[str] = typer.Option(None, "--data", help="the task's data folder or file"),
    model: Optional[str] = typer.Option(None, "--model", help="checkpoint folder (or hub id) to start from"),
    size: Optional[str] = typer.Option(None, "--size", help="from scratch: tiny | small | base (T5 v1.1 shapes)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder, or 'byte' (built in)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="or epochs (x the first epoch's steps)"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="padded encoder+decoder tokens per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adafactor"),
    lr: float = typer.Option(3e-4, "--lr"),
    position_lr_scale: float = typer.Option(
        1.0, "--position-lr-scale", help="the relative-position biases learn at lr x this"
    ),
    position_init_std: Optional[float] = typer.Option(
        None, "--position-init-std", help="from scratch: initial std of the position biases"
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup_steps: int = typer.Option(0, "--warmup-steps"),
    schedule: str = typer.Option("linear", "--schedule", help="linear | cosine | constant (after warm-up)"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="0: no clipping"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 (autocast)"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="override the model's dropout rate"),
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length"),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="left | right: cut documents over the limit"),
    max_target_tokens: int = typer.Option(64, "--max-target-tokens", help="longest target (with EOS) accepted"),
    on_bad: str = typer.Option("error", "--on-bad", help="error | skip (skipped examples are counted)"),
    max_subtasks: Optional[int] = typer.Option(None, "--max-subtasks", help="sample this many subtasks per example"),
    downsample: Optional[str] = typer.Option(None, "--downsample", help="VALUE:KEEP, e.g. none:0.3"),
    eval_every: int = typer.Option(0, "--eval-every", help="steps between evaluations (0: at the end)"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="evaluate on the first N examples"),
    save_every: int = typer.Option(0, "--save-every", help="steps between checkpoints (0: at the end)"),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints"),
    log_every: int = typer.Option(1, "--log-every"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    lora_r: int = typer.Option(0, "--lora-r", help="LoRA rank (0: train every weight)"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha"),
    lora_targets: str = typer.Option("q,v", "--lora-targets", help="module names, e.g. q,v or q,k,v,o,wi_0,wi_1,wo"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
) -> None:
    """Train a T5 in the pid, pie or seq layout (run under `accelerate launch` for data parallel)."""

    try:
        if resume is not None:
            opts = {p.name: p.opts[0] for p in ctx.command.params}
            given = [
                opts.get(p, p)
                for p in ctx.params
                if p != "resume" and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"
            ]
            if given:
                fail(f"--resume continues with the run's saved settings; drop {', '.join(given)}")
            result = training.resume(resume)
        else:
            if output is None:
                fail("--output DIR is required (or --resume DIR)")
            cfg = training.TrainConfig(
                output=output,
                layout=layout,
                train=train_file,
                eval=eval_file,
                task=task,
                data=data,
                model=model,
                size=size,
                tokenizer=tokenizer,
                steps=steps,
                epochs=epochs,
                batch_tokens=batch_tokens,
                grad_accum=grad_accum,
                optimizer=optimizer,
                lr=lr,
                position_lr_scale=position_lr_scale,
                position_init_std=position_init_std,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                schedule=schedule,
                max_grad_norm=max_grad_norm,
                gradient_checkpointing=gradient_checkpointing,
                precision=precision,
                dropout=dropout,
                max_input_length=max_input_length,
                truncate=truncate,
                max_target_tokens=max_target_tokens,
                on_bad=on_bad,
                max_subtasks=max_subtasks,
                downsample=training.parse_downsample(downsample),
                eval_every=eval_every,
                eval_limit=eval_limit,
                save_every=save_every,
                keep_checkpoints=keep_checkpoints,
                log_every=log_every,
                seed=seed,
                device=device,
                lora_r=lora_r,
                lora_alpha=lora_alpha,
                lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
                lora_dropout=lora_dropout,
            )
            result = training.train(cfg)
    except (DataError, CheckpointError, ValueError) as e:
        fail(str(e))
    if result.get("rank", 0) == 0:
        typer.echo(json.dumps(result))


@app.command()
def compare(
    output: str = typer.Option(..., "--output", "-o", help="parent folder: one run per layout, results.json/md"),
    task: str = typer.Option(..., "--task", help="a registered task (see `pidec tasks`)"),
    data: Optional[str] = typer.Option(None, "--data", help="the task's data folder or file"),
    layouts: str = typer.Option("seq,pie,pid", "--layouts", help="comma-separated, trained in this order"),
    model: Optional[str] = typer.Option(None, "--model", help="checkpoint folder to start every layout from"),
    size: Optional[str] = typer.Option(None, "--size", help="from scratch: tiny | small | base"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder, or 'byte'"),
    steps: int = typer.Option(..., "--steps", help="optimizer steps, the same for every layout"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="padded encoder+decoder tokens per step"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adafactor"),
    lr: float = typer.Option(1e-3, "--lr"),
    position_lr_scale: float = typer.Option(1.0, "--position-lr-scale", help="position biases learn at lr x this"),
    position_init_std: Optional[float] = typer.Option(None, "--position-init-std", help="their initial std"),
    warmup_steps: int = typer.Option(0, "--warmup-steps"),
    schedule: str = typer.Option("cosine", "--schedule", help="linear | cosine | constant"),
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length"),
    max_target_tokens: int = typer.Option(64, "--max-target-tokens", help="longest target (with EOS) accepted"),
    on_bad: str = typer.Option("skip", "--on-bad", help="error | skip (skipped examples are counted)"),
    max_subtasks: Optional[int] = typer.Option(None, "--max-subtasks"),
    downsample: Optional[str] = typer.Option(None, "--downsample", help="VALUE:KEEP, e.g. none:0.3"),
    eval_split: str = typer.Option("test", "--eval-split"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="evaluate on the first N examples"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="documents decoded together"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="per subtask (default: the task's)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 (autocast)"),
) -> None:
    """Train seq, pie and pid on the same budget (steps x tokens per step) and compare metric and speed."""

    try:
        names = parse_layouts(layouts)
        cfg = training.TrainConfig(
            output=output,
            # checked as a pid/pie run where there is one: their subtask sampling is left out for seq
            layout=next((n for n in names if n != "seq"), names[0]),
            task=task,
            data=data,
            model=model,
            size=size,
            tokenizer=tokenizer,
            steps=steps,
            batch_tokens=batch_tokens,
            optimizer=optimizer,
            lr=lr,
            position_lr_scale=position_lr_scale,
            position_init_std=position_init_std,
            warmup_steps=warmup_steps,
            schedule=schedule,
            max_input_length=max_input_length,
            max_target_tokens=max_target_tokens,
            on_bad=on_bad,
            max_subtasks=max_subtasks,
            downsample=training.parse_downsample(downsample),
            seed=seed,
            device=device,
            precision=precision,
        )
        cfg.check()
        result = run_comparison(
            cfg, names, eval_split, eval_limit, eval_batch_size=eval_batch_size, max_new_tokens=max_new_tokens
        )
    except (DataError, CheckpointError, ValueError) as e:
        fail(str(e))
    typer.echo(format_results(result))
