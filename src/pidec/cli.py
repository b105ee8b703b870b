"""`pidec ...`: parse, call the library, print. Errors go to stderr as one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Encode once, decode every subtask in parallel.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


NO_PACK_HELP = "plain BLAS linear layers on the CPU (less memory) instead of oneDNN-packed weights"


def _check_quantize(value: Optional[str]) -> Optional[str]:
    """--quantize is checked before anything is loaded."""
    from pidec.quantize import QuantizeError, check_method

    try:
        return check_method(value)
    except QuantizeError as e:
        _fail(str(e))


def _read_text(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        _fail(f"{what} file {path} not found")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        _fail(f"{what} file {path} is not UTF-8 text ({e})")


def read_prompts_file(path: str) -> list[str]:
    """A .json file holding a list of strings, or plain text with one prompt a line (empty lines
    are skipped; a whitespace-only line is an error naming its line)."""
    text = _read_text(path, "prompts")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            _fail(f"{path}: expected a JSON list of strings")
        return data
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line == "":
            continue
        if not line.strip():
            _fail(f"{path}:{n}: prompt is whitespace only")
        prompts.append(line.strip())
    return prompts


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    document: str = typer.Option(..., "--document", help="file holding the document, or - for stdin"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a subtask prompt (repeatable)"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="one prompt a line, or a JSON list"),
    layout: str = typer.Option("pid", "--layout", help="pid | pie | seq"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    num_beams: int = typer.Option(1, "--num-beams"),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="left | right: cut a too-long document"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder if the checkpoint has none"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: int8 weights and activations in the linear layers", callback=_check_quantize
    ),
    compile_steps: bool = typer.Option(
        False, "--compile", help="decoding steps through torch.compile (slow start, faster steps)"
    ),
    no_pack: bool = typer.Option(False, "--no-pack", help=NO_PACK_HELP),
) -> None:
    """Answer every prompt about one document; prints {"outputs": [...], "timings": {...}}."""
    import pidec
    from pidec.checkpoint import CheckpointError
    from pidec.layouts import LAYOUTS

    if layout not in LAYOUTS:
        _fail(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if truncate not in (None, "left", "right"):
        _fail(f"--truncate {truncate!r}: expected left or right")
    prompts = list(prompt or [])
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        _fail("no prompts: give --prompt P (repeatable) or --prompts-file F")
    text = _read_text(document, "document")
    try:
        m = pidec.load(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            quantize=quantize,
            compile=compile_steps,
            pack_weights=False if no_pack else None,
        )
        result = m.generate(
            text,
            prompts,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            layout=layout,
            truncate=truncate,
            return_details=True,
        )
    except (pidec.InputError, CheckpointError) as e:
        _fail(str(e))
    out = result.to_dict()
    out["outputs"] = out["outputs"][0]
    typer.echo(json.dumps(out, ensure_ascii=False))


@app.command()
def bench(
    workload: str = typer.Option("dst", "--workload", help="dst | summ | qa"),
    model_size: str = typer.Option("base", "--model-size", help="tiny | small | base | large (random weights)"),
    model: Optional[str] = typer.Option(None, "--model", help="a checkpoint folder instead of --model-size"),
    configs: Optional[str] = typer.Option(
        None,
        "--configs",
        help="comma list of configurations (default: hf-pie,hf-pid-expanded,pidec-seq,pidec-pie,pidec-pid; "
        "with --sweep-k: hf-pie,ct2-pie-int8,pidec-pie,pidec-pid,pidec-pid-int8)",
    ),
    docs: int = typer.Option(2, "--docs", help="documents per configuration"),
    repeats: int = typer.Option(3, "--repeats", help="passes over the documents"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results as JSON here"),
    train_mode: bool = typer.Option(False, "--train", help="time training steps of the layouts instead"),
    layouts: str = typer.Option("pid,pie", "--layouts", help="with --train: comma list of pid, pie, seq"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: the pidec and ct2 configurations in int8", callback=_check_quantize
    ),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="e.g. 8GiB: also report how many documents fit (analytic)"
    ),
    memory_only: bool = typer.Option(False, "--memory-only", help="with --memory-budget: only that report, no timing"),
    sweep_k: Optional[str] = typer.Option(
        None, "--sweep-k", help="e.g. 1,2,4,8,16,32,64: latency per document against the number of prompts K"
    ),
    plot: Optional[str] = typer.Option(None, "--plot", help="with --sweep-k: write a log-log PNG plot here"),
    compile_steps: bool = typer.Option(
        False, "--compile", help="the float pidec configurations decode through torch.compile"
    ),
    no_pack: bool = typer.Option(False, "--no-pack", help=NO_PACK_HELP),
) -> None:
    """Time the configurations side by side on one workload and print a table. More configurations:
    pidec-{seq,pie,pid}-int8, ct2-pie, ct2-prefix (+ -int8; needs the ct2 extra: pip install ctranslate2)."""
    from pidec.bench.harness import format_memory, format_table, run_bench, run_memory

    names = None if configs is None else [c.strip() for c in configs.split(",") if c.strip()]
    if compile_steps and (train_mode or sweep_k or memory_only):
        _fail("--compile applies to a timed decoding run: leave out --train, --sweep-k and --memory-only")
    if plot and not sweep_k:
        _fail("--plot draws the --sweep-k results: give --sweep-k too")
    if sweep_k:
        if train_mode or memory_budget or quantize:
            _fail("--sweep-k times decoding per K: leave out --train, --memory-budget and --quantize")
        from pidec.bench.sweep import format_sweep, parse_ks, plot_sweep, run_sweep

        try:
            sweep = run_sweep(
                parse_ks(sweep_k),
                names,
                workload,
                model_size,
                model,
                docs=docs,
                repeats=repeats,
                dtype=dtype,
                seed=seed,
                threads=threads,
                pack=not no_pack,
                progress=lambda k, r: typer.echo(
                    f"K={k}: " + ", ".join(f"{x['config']} {x['latency_s_median']:.3f}s" for x in r["results"])
                ),
            )
        except ValueError as e:
            _fail(str(e))
        typer.echo(format_sweep(sweep))
        if json_out:
            Path(json_out).write_text(json.dumps(sweep, indent=2) + "\n")
            typer.echo(f"wrote {json_out}")
        if plot:
            plot_sweep(sweep, plot)
            typer.echo(f"wrote {plot}")
        return
    if memory_only:
        if memory_budget is None:
            _fail("--memory-only needs --memory-budget SIZE (e.g. 8GiB)")
        try:
            mem = run_memory(
                workload,
                model_size,
                model,
                names,
                memory_budget,
                dtype,
                quantize,
                pack=not no_pack,
            )
        except ValueError as e:
            _fail(str(e))
        typer.echo(format_memory(mem))
        if json_out:
            Path(json_out).write_text(json.dumps(mem, indent=2) + "\n")
        return
    if train_mode and (quantize or memory_budget):
        _fail("--train times training steps: --quantize and --memory-budget apply to decoding")
    if train_mode:
        from pidec.bench.training import format_train_table, run_train_bench

        try:
            result = run_train_bench(
                workload,
                model_size,
                [x.strip() for x in layouts.split(",") if x.strip()],
                docs=docs,
                repeats=repeats,
                seed=seed,
                threads=threads,
            )
        except ValueError as e:
            _fail(str(e))
        typer.echo(format_train_table(result))
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        return

    try:
        result = run_bench(
            workload=workload,
            model_size=model_size,
            model_dir=model,
            configs=names,
            docs=docs,
            repeats=repeats,
            device=device,
            dtype=dtype,
            seed=seed,
            threads=threads,
            quantize=quantize,
            memory_budget=memory_budget,
            compile=compile_steps,
            pack=not no_pack,
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


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
    from pidec.checkpoint import CheckpointError
    from pidec.data import DataError
    from pidec.training import loop as training

    try:
        if resume is not None:
            opts = {p.name: p.opts[0] for p in ctx.command.params}
            given = [
                opts.get(p, p)
                for p in ctx.params
                if p != "resume" and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"
            ]
            if given:
                _fail(f"--resume continues with the run's saved settings; drop {', '.join(given)}")
            result = training.resume(resume)
        else:
            if output is None:
                _fail("--output DIR is required (or --resume DIR)")
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
        _fail(str(e))
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
    from pidec.checkpoint import CheckpointError
    from pidec.data import DataError
    from pidec.training import loop as training
    from pidec.training.compare import format_results, parse_layouts, run_comparison

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
        _fail(str(e))
    typer.echo(format_results(result))


@app.command("export")
def export_checkpoint(
    checkpoint_dir: str = typer.Option(..., "--checkpoint", help="checkpoint folder, or a LoRA adapter folder"),
    out: str = typer.Option(..., "--out", help="folder to write the Hugging Face checkpoint to"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="merge a LoRA adapter into its base model"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: as stored)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="not here: quantize when loading"),
) -> None:
    """Write a plain Hugging Face checkpoint: a LoRA adapter merged into its base, or a checkpoint re-saved."""
    import pidec
    from pidec import lora
    from pidec.api import parse_dtype
    from pidec.checkpoint import CheckpointError

    if quantize is not None:
        _fail(
            f"--quantize {quantize}: export writes float weights in the Hugging Face format; int8 is made when "
            "loading: pidec generate / eval / serve / bench --quantize int8"
        )
    if not Path(checkpoint_dir).is_dir():
        _fail(f"--checkpoint {checkpoint_dir}: no such folder")
    adapter = lora.is_adapter(checkpoint_dir)
    if adapter and not merge_lora:
        _fail(f"{checkpoint_dir} is a LoRA adapter: a LoRA checkpoint must be merged into its base, pass --merge-lora")
    if merge_lora and not adapter:
        _fail(f"--merge-lora: {checkpoint_dir} is not a LoRA adapter folder (no adapter_config.json, or a config.json)")
    try:
        written = lora.export(checkpoint_dir, out, dtype=None if dtype is None else parse_dtype(dtype))
    except (pidec.InputError, CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {written}")


@app.command("tasks")
def list_tasks() -> None:
    """List the tasks that --task accepts: splits, main metric, default data path."""
    from pidec import tasks as registry

    for name in registry.names():
        t = registry.get(name)
        where = registry.data_root() / t.default_path if t.default_path else "give --data PATH"
        typer.echo(f"{name}: {t.description}")
        typer.echo(f"    splits: {', '.join(t.splits)}; main metric: {t.main_metric}; data: {where}")


@app.command("eval")
def eval_task(
    task: str = typer.Option(..., "--task", help="a task from `pidec tasks`"),
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    layout: str = typer.Option("pid", "--layout", help="pid | pie | seq"),
    split: str = typer.Option("test", "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", help="the first N examples of the split"),
    data: Optional[str] = typer.Option(None, "--data", help="the task's data folder or file (default: its own)"),
    out: Optional[str] = typer.Option(None, "--out", help="folder for the metrics JSON and predictions JSONL"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="per subtask (default: the task's)"),
    num_beams: int = typer.Option(1, "--num-beams"),
    batch_size: int = typer.Option(8, "--batch-size", help="documents decoded together"),
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length", help="encoder limit (default: model's)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder if the checkpoint has none"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: int8 weights and activations in the linear layers", callback=_check_quantize
    ),
    no_pack: bool = typer.Option(False, "--no-pack", help=NO_PACK_HELP),
) -> None:
    """Score a model on a task's split; prints {"metrics": ..., "speed": ...} and, with --out,
    writes TASK-SPLIT-LAYOUT.metrics.json and .predictions.jsonl."""
    import pidec
    from pidec import tasks as registry
    from pidec.checkpoint import CheckpointError
    from pidec.evaluate import evaluate, write
    from pidec.layouts import LAYOUTS

    if layout not in LAYOUTS:
        _fail(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    for name, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            _fail(f"{name} must be >= 1, got {value}")
    try:
        spec = registry.get(task)
        examples = spec.load(split, data, limit=limit)
        m = pidec.load(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            max_input_length=max_input_length,
            quantize=quantize,
            pack_weights=False if no_pack else None,
        )
        result = evaluate(m, spec, examples, layout, max_new_tokens, num_beams, batch_size)
    except (pidec.InputError, CheckpointError, ValueError) as e:
        _fail(str(e))
    summary = result.summary() | {"split": split}
    if out:
        summary["wrote"] = [str(p) for p in write(result, out, f"{task}-{split}-{layout}")]
    typer.echo(json.dumps(summary, ensure_ascii=False))


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind: loopback unless told otherwise"),
    port: int = typer.Option(8000, "--port", help="0 picks a free port"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: int8 weights and activations in the linear layers", callback=_check_quantize
    ),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder if the checkpoint has none"),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="PIDEC_API_KEY", help="require 'Authorization: Bearer KEY' (prefer PIDEC_API_KEY)"
    ),
    max_batch_documents: Optional[int] = typer.Option(
        None, "--max-batch-documents", help="requests decoded together (default 32); 1 turns batching off"
    ),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="batch token budget (32768)"),
    max_wait_ms: Optional[float] = typer.Option(None, "--max-wait-ms", help="idle wait to gather a batch (5)"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="requests waiting before 429 (64)"),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="seconds before 504 (120)"),
    max_document_tokens: Optional[int] = typer.Option(
        None, "--max-document-tokens", help="default: the model's max_input_length"
    ),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="prompts per request (64)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", help="tokens per prompt (64)"),
    max_new_tokens_limit: Optional[int] = typer.Option(None, "--max-new-tokens-limit", help="per prompt (256)"),
    default_max_new_tokens: Optional[int] = typer.Option(None, "--default-max-new-tokens", help="(32)"),
    max_num_beams: Optional[int] = typer.Option(None, "--max-num-beams", help="(8)"),
    max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", help="(1 MiB)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical | error | warning | info | debug"),
    no_pack: bool = typer.Option(False, "--no-pack", help=NO_PACK_HELP),
) -> None:
    """HTTP service: POST /v1/generate batches concurrent requests into shared-cache decoding;
    GET /healthz, /readyz, /metrics. On SIGTERM it stops accepting, finishes what it holds, exits."""
    import pidec
    from pidec.checkpoint import CheckpointError
    from pidec.serving.app import ServeSettings, run_server

    if not 0 <= port <= 65535:
        _fail(f"--port {port}: expected 0-65535")
    given = dict(
        api_key=api_key,
        max_batch_documents=max_batch_documents,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_document_tokens=max_document_tokens,
        max_prompts=max_prompts,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
        default_max_new_tokens=default_max_new_tokens,
        max_num_beams=max_num_beams,
        max_body_bytes=max_body_bytes,
    )
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    if threads is not None:
        import torch

        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        m = pidec.load(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            quantize=quantize,
            pack_weights=False if no_pack else None,
        )
        settings.checked(m)
    except (pidec.InputError, CheckpointError, ValueError) as e:
        _fail(str(e))
    run_server(m, settings, host=host, port=port, log_level=log_level)


@app.command()
def loadtest(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="a running `pidec serve`"),
    concurrency: int = typer.Option(16, "--concurrency", help="clients, each sending one request after another"),
    duration: float = typer.Option(60.0, "--duration", help="seconds; then requests in flight are awaited"),
    workload: str = typer.Option("dst", "--workload", help="dst | qa | summ: the shapes of `pidec bench`"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PIDEC_API_KEY"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a URL that is not loopback"),
    timeout: float = typer.Option(300.0, "--timeout", help="client timeout per request, seconds"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """Load a running service for --duration seconds; print requests/s, documents/s, latency
    p50/p95/p99 and errors by kind."""
    from pidec.bench.loadtest import format_report, run_loadtest

    try:
        report = run_loadtest(
            url,
            concurrency=concurrency,
            duration_s=duration,
            workload=workload,
            api_key=api_key,
            allow_remote=allow_remote,
            seed=seed,
            timeout_s=timeout,
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


@app.command()
def demo(
    output: str = typer.Option("pidec-demo", "--output", "-o", help="folder for the data, model, table and plot"),
    steps: int = typer.Option(1400, "--steps", help="training steps"),
    train_examples: int = typer.Option(12000, "--train-examples"),
    test_examples: int = typer.Option(300, "--test-examples"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate a synthetic booking task, train a small T5 on it in pid, compare decoders."""
    from pidec.demo.run import format_result, run_demo

    if steps < 1 or train_examples < 1 or test_examples < 1:
        _fail("--steps, --train-examples and --test-examples must be >= 1")
    result = run_demo(output, train_examples=train_examples, test_examples=test_examples, steps=steps, seed=seed)
    typer.echo(format_result(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
