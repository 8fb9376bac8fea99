"""`sinklora train`: LoRA+ context-extension fine-tuning with an SF-Attn / S²-Attn pattern (SPEC §2, §4).

Runs on the Hugging Face Trainer, so one CPU, one GPU, ``torchrun`` and ``accelerate launch`` (DDP,
FSDP, DeepSpeed) all work; gradient checkpointing, bf16 on GPU, progress bars and resumable
checkpoints come with it. Output: a peft adapter (LoRA + embeddings + norms) plus
``sinklora.json`` (how to rebuild the base: model, context extension, pattern); ``--merge`` also
writes a plain transformers checkpoint.

Nothing half-written is ever read as valid. The output directory is written into a temporary
sibling, fsynced and renamed into place. Checkpoints (``--save-steps``, in ``OUTPUT.checkpoints/``)
are the Trainer's; once every file of one is written and fsynced, ``sinklora_checkpoint.json``
marks it complete (with the settings of the run). ``--resume`` continues from the newest marked
checkpoint, removes unmarked ones (a run killed while saving) and refuses one written by a run with
another model, context, pattern or LoRA rank; without a complete checkpoint it starts from the
beginning. A run without ``--resume`` discards the checkpoints of an earlier run.

Test hook: ``SINKLORA_TEST_SAVE_PAUSE=SECONDS`` sleeps inside every save window (files written, not
yet marked complete or renamed into place) after printing a line to stderr, so that a test can
kill the process there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .patterns import PRESETS
from .usage import (CHECKPOINT_MARKER, MissingInput, UsageError, at_least, check_device, check_model_dir,
                    check_output_dir, flag, in_unit_interval, positive_finite, read_json_file, read_text_file)

METADATA = "sinklora.json"
SAVE_PAUSE_ENV = "SINKLORA_TEST_SAVE_PAUSE"
# what a resumed run must share with the run that wrote the checkpoint
RUN_SETTINGS = ("model", "context", "original_context", "attn", "group_ratio", "sinks", "lora_r", "lora_alpha")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="plain text files (packed into windows) or LongAlpaca .json")
    p.add_argument("--context", type=int, required=True, help="training context in tokens (RoPE is interpolated to it)")
    p.add_argument("--attn", default="sf", choices=sorted(PRESETS), help="attention pattern during training")
    p.add_argument("--group-ratio", type=float, default=0.25)
    p.add_argument("--sinks", type=int, default=None, help="sink tokens (default: the preset's)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--output", default="sinklora-out", help="output directory (adapter + metadata)")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--original-context", type=int, default=None,
                   help="the context the model was pretrained for (default: its config); RoPE factor = context / this")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate (LongLoRA/SinkLoRA: 2e-5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default min(20, steps // 10)")
    p.add_argument("--batch-size", type=int, default=1, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=None, help="use at most this many training windows")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: GPU when there is one)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every K steps (resumable)")
    p.add_argument("--resume", action="store_true",
                   help="resume from the newest complete checkpoint in OUTPUT.checkpoints (none: start over)")
    p.add_argument("--fsdp", default=None, metavar="OPTIONS",
                   help='shard with FSDP under torchrun, e.g. "full_shard auto_wrap" (GPUs only; or use accelerate launch)')
    p.add_argument("--deepspeed", default=None, metavar="CONFIG",
                   help="DeepSpeed config JSON, ZeRO stage 2 or 3, CPU or GPU (or use accelerate launch)")
    p.add_argument("--no-shuffle", action="store_true", help="train on windows in order (reproducible across launchers)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--merge", action="store_true", help="also save the merged model (plain transformers)")
    p.add_argument("--log-steps", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_dataset(tokenizer, paths: list[str], context: int, max_windows: int | None):
    from . import data

    check_data(paths)
    sets = []
    for path in paths:
        if path.endswith(".json"):
            sets.append(data.LongAlpacaDataset(tokenizer, path, context))
        else:
            sets.append(data.PackedTextDataset(tokenizer, [path], context))
    dataset = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)
    if max_windows is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_windows, len(dataset))))
    if len(dataset) == 0:
        raise UsageError(f"--data: no training window of --context {context} tokens in {' '.join(paths)}")
    return dataset


def check_data(paths: list[str]) -> None:
    """Every --data file is non-empty UTF-8 text, or (.json) a LongAlpaca list of items."""
    from .data import load_longalpaca_items

    for path in paths:
        if path.endswith(".json"):
            load_longalpaca_items(path, "--data")
        else:
            read_text_file(path, "--data")


def check_arguments(args) -> None:
    """Everything that can be checked before the model loads."""
    at_least(args, 2, "context")
    at_least(args, 1, "steps", "batch_size", "grad_accum", "lora_r", "max_windows", "save_steps", "log_steps",
             "original_context")
    at_least(args, 0, "sinks", "warmup_steps")
    in_unit_interval(args, "group_ratio")
    positive_finite(args, "lr", "lora_alpha")
    check_device(args.device)
    check_model_dir(args.model)
    check_output_dir(args.output)
    check_data(args.data)


def prepare_model(args):
    """Load the base model, extend its context, wrap it for LoRA+ and select the pattern."""
    from .hf.attention import set_attention
    from .hf.lora import apply_lora_plus, extend_context
    from .hf.models import load_model

    model, tokenizer = load_model(args.model, dtype=_dtype(args.dtype), device=args.device)
    factor = extend_context(model, args.context, getattr(args, "original_context", None))
    model = apply_lora_plus(model, r=args.lora_r, alpha=args.lora_alpha)
    group_size = max(1, int(args.context * args.group_ratio))
    set_attention(model, args.attn, args.group_ratio, args.sinks, during="train", group_size=group_size)
    return model, tokenizer, factor


def _dtype(name: str | None):
    return None if name is None else getattr(torch, name)


class _LossLog:
    """Collects the logged training losses (the first one is the first step's)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    outer.losses.append((state.global_step, float(logs["loss"])))

        self.losses: list[tuple[int, float]] = []
        self.callback = Callback()


def _checkpointing_arguments(training_arguments, enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers uses (``activation_checkpointing``
    in recent 5.x, ``gradient_checkpointing`` in 5.17 and before)."""
    prefix = "activation" if "activation_checkpointing" in training_arguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def _check_sharding(args) -> None:
    """--fsdp / --deepspeed fail here, with the rule, rather than deep inside the Trainer."""
    fsdp, deepspeed = getattr(args, "fsdp", None), getattr(args, "deepspeed", None)
    if fsdp and deepspeed:
        raise UsageError("--fsdp and --deepspeed exclude each other")
    gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if fsdp and not gpu:
        raise UsageError("--fsdp needs CUDA devices (the Trainer shards across accelerators only); "
                         "on the CPU, torchrun runs data-parallel (DDP) without it, or use --deepspeed")
    if not deepspeed:
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    if not Path(deepspeed).exists():
        raise MissingInput(f"--deepspeed: no such config file: {deepspeed}")
    if not isinstance(read_json_file(deepspeed, "--deepspeed"), dict):
        raise UsageError(f"--deepspeed: {deepspeed} must hold a JSON object")


def _gathered_state_dict(trainer) -> dict | None:
    """The full model state on rank 0, gathered from the shards under FSDP or ZeRO-3. A collective:
    every rank calls it."""
    wrapped = trainer.model_wrapped
    if trainer.is_deepspeed_enabled and wrapped.zero_optimization_stage() == 3:
        # what accelerate calls, without its demand for stage3_gather_16bit_weights_on_model_save
        return wrapped._zero3_consolidated_16bit_state_dict()
    return trainer.accelerator.get_state_dict(wrapped)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _run_settings(args) -> dict:
    return {name: getattr(args, name, None) for name in RUN_SETTINGS}


def _pause_for_tests(path: Path) -> None:
    seconds = float(os.environ.get(SAVE_PAUSE_ENV) or 0)
    if seconds > 0:
        print(f"sinklora: {SAVE_PAUSE_ENV}: pausing {seconds:g} s before {path} is complete", file=sys.stderr,
              flush=True)
        time.sleep(seconds)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """The Trainer's ``checkpoint-STEP`` directories, oldest step first."""
    found = []
    for path in work_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def _resume_point(args, work_dir: Path) -> Path | None:
    """The newest complete checkpoint of this run (None: start from the beginning); the main
    process removes the incomplete ones."""
    complete = []
    for step, path in _checkpoints(work_dir):
        if (path / CHECKPOINT_MARKER).is_file():
            complete.append((step, path))
        elif _is_main_process():
            print(f"sinklora: removing the incomplete checkpoint {path} (no {CHECKPOINT_MARKER})", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
    if not complete:
        print(f"sinklora: --resume: no complete checkpoint in {work_dir}; training from the start", file=sys.stderr)
        return None
    step, path = complete[-1]
    written = read_json_file(path / CHECKPOINT_MARKER, "--resume")
    run = written.get("run") if isinstance(written, dict) else None
    if not isinstance(run, dict):
        raise UsageError(f"--resume: {path / CHECKPOINT_MARKER} is not a sinklora checkpoint marker")
    ours = _run_settings(args)
    differ = [f"{flag(name)} {run.get(name)!r} there, {ours[name]!r} here" for name in RUN_SETTINGS
              if run.get(name) != ours[name]]
    if differ:
        raise UsageError(f"--resume: {path} was written by another run ({'; '.join(differ)})")
    if step > args.steps:
        raise UsageError(f"--steps ({args.steps}) must be >= the step of the checkpoint resumed ({step}, {path})")
    print(f"sinklora: resuming from {path}", file=sys.stderr)
    return path


class _MarkCompleteCheckpoints:
    """Marks each checkpoint complete once all processes wrote it: fsync its files, then write the
    marker (a temporary file, fsynced and renamed)."""

    def __init__(self, settings: dict):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.barrier()
                if state.is_world_process_zero:
                    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    _fsync_tree(checkpoint)
                    _pause_for_tests(checkpoint)
                    marker = checkpoint / (CHECKPOINT_MARKER + ".tmp")
                    with open(marker, "w") as f:
                        json.dump({"step": state.global_step, "run": settings}, f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(marker, checkpoint / CHECKPOINT_MARKER)
                    _fsync(checkpoint)

        self.callback = Callback()


def train(args) -> dict:
    check_arguments(args)
    _check_sharding(args)
    output = Path(args.output)
    work_dir = output.with_name(output.name + ".checkpoints")
    check_output_dir(work_dir, "--output (its checkpoints)")
    resume = _resume_point(args, work_dir) if args.resume else None
    if not args.resume and _is_main_process() and _checkpoints(work_dir):
        print(f"sinklora: discarding the checkpoints of an earlier run in {work_dir} (no --resume)", file=sys.stderr)
        shutil.rmtree(work_dir)

    from transformers import Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    model, tokenizer, factor = prepare_model(args)
    dataset = build_dataset(tokenizer, args.data, args.context, args.max_windows)
    from .data import collate_batch

    on_gpu = next(model.parameters()).is_cuda
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks anyway, without warning about it
    warmup = args.warmup_steps if args.warmup_steps is not None else min(20, args.steps // 10)
    training_args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        warmup_steps=warmup,
        lr_scheduler_type="constant_with_warmup",
        logging_steps=args.log_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        **_checkpointing_arguments(TrainingArguments, not args.no_gradient_checkpointing),
        bf16=on_gpu and next(model.parameters()).dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        ddp_backend="gloo" if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        fsdp=getattr(args, "fsdp", None) or "",
        deepspeed=getattr(args, "deepspeed", None),
        train_sampling_strategy="sequential" if args.no_shuffle else "random",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    log = _LossLog()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate_batch(tokenizer),
                      callbacks=[log.callback, _MarkCompleteCheckpoints(_run_settings(args)).callback])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    summary = {
        "output": str(output),
        "attn": args.attn,
        "context": args.context,
        "rope_factor": factor,
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "first_loss": log.losses[0][1] if log.losses else None,
        "last_loss": log.losses[-1][1] if log.losses else None,
        "losses": log.losses,
        "windows": len(dataset),
    }
    state_dict = _gathered_state_dict(trainer)
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else rank 0's reload for --merge would load ZeRO-3-partitioned (a collective)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        save(model, tokenizer, output, args, factor, merge=args.merge, state_dict=state_dict)
    return summary


def save(model, tokenizer, output: Path, args, factor: float, merge: bool = False, state_dict=None) -> None:
    """Write adapter + metadata (+ merged model) into a temp dir, fsync it, then move it into place
    (the temp dirs of killed runs are removed first).

    ``state_dict``: the full model state (gathered when training sharded it); default the model's own.
    The merged model is rebuilt from the saved adapter, so it never depends on sharded parameters."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(output.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        meta = {
            "base_model": args.model,
            "context": args.context,
            "rope_factor": factor,
            "original_context": getattr(args, "original_context", None),
            "attn": args.attn,
            "group_ratio": args.group_ratio,
            "sinks": args.sinks,
            "steps": args.steps,
            "lr": args.lr,
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))
        if merge:
            dtype = next(iter(model.get_base_model().parameters())).dtype
            trained, _ = load_trained(tmp, dtype=dtype, device="cpu")
            trained.merge_and_unload().save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
        _fsync_tree(tmp)
        _pause_for_tests(output)
        if output.exists():
            backup = output.with_name(output.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(output, backup)
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
        _fsync(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_trained(output: str | Path, *, dtype=None, device=None):
    """Rebuild a `sinklora train` result: base model, its context extension, the adapter on top."""
    from peft import PeftModel

    from .hf.lora import extend_context
    from .hf.models import load_model

    output = Path(output)
    meta = json.loads((output / METADATA).read_text())
    model, tokenizer = load_model(meta["base_model"], dtype=dtype, device=device)
    extend_context(model, meta["context"], meta.get("original_context"))
    return PeftModel.from_pretrained(model, output), tokenizer


def main(args) -> dict:
    summary = train(args)
    if _is_main_process():
        print(f"trained {summary['steps']} steps with {summary['attn']} at context {summary['context']}: "
              f"loss {summary['first_loss']} -> {summary['last_loss']}; saved to {summary['output']}")
        if args.json:
            print(json.dumps(summary))
    return summary
