"""`sinklora train`: LoRA+ context-extension fine-tuning with an SF-Attn / S²-Attn pattern
(docs/training.md; flags in docs/cli.md).

``train(TrainConfig(data=[...], context=N, attn="sf", ...))`` is the library call; `sinklora train`
builds the same :class:`TrainConfig` from its flags (each field is the flag of its name). Runs on
the Hugging Face Trainer, so one CPU, one GPU, ``torchrun`` and ``accelerate launch`` (DDP, FSDP,
DeepSpeed) all work; gradient checkpointing, bf16 on GPU, progress bars and resumable
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

Checkpoints and the output are written as ``sinklora_ext.atomic`` says (its test hook pauses in
every save window, before a checkpoint is marked complete or the output renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .atomic import atomic_directory, fsync, fsync_tree, pause_for_tests
from .cli import is_main_process
from .cli.options import DeviceOptions, option
from .hf.models import base_model
from .patterns import PRESETS, group_size_for
from .usage import (CHECKPOINT_MARKER, INT32_MAX, MissingInput, UsageError, check_model_dir, check_output_dir, flag,
                    read_json_file, read_text_file)

METADATA = "sinklora.json"
# what a resumed run must share with the run that wrote the checkpoint
RUN_SETTINGS = ("model", "context", "original_context", "attn", "group_ratio", "sinks", "lora_r", "lora_alpha")


@dataclass(kw_only=True)
class TrainConfig(DeviceOptions):
    """Everything `sinklora train` takes; each field is the flag of its name (docs/training.md)."""

    data: list[str] = option(help="plain text files (packed into windows) or LongAlpaca .json")
    context: int = option(minimum=2, help="training context in tokens (RoPE is interpolated to it)")
    attn: str = option("sf", choices=sorted(PRESETS), help="attention preset during training (patterns.PRESETS)")
    group_ratio: float = option(0.25, unit_interval=True, help="group size / context (default 0.25)")
    sinks: int | None = option(None, minimum=0, help="sink tokens (default: the preset's)")
    steps: int = option(100, minimum=1, help="optimizer steps")
    output: str = option("sinklora-out", help="output directory (adapter + metadata)")
    model: str | None = option(None, help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    original_context: int | None = option(None, minimum=1, help="the context the model was pretrained for "
                                                                "(default: its config); RoPE factor = context / this")
    lr: float = option(2e-5, positive=True, help="learning rate (LongLoRA/SinkLoRA: 2e-5)")
    warmup_steps: int | None = option(None, minimum=0, help="default min(20, steps // 10)")
    batch_size: int = option(1, minimum=1, help="per device")
    grad_accum: int = option(1, minimum=1)
    lora_r: int = option(8, minimum=1)
    lora_alpha: int = option(16, positive=True)
    max_windows: int | None = option(None, minimum=1, help="use at most this many training windows")
    no_gradient_checkpointing: bool = option(False)
    save_steps: int | None = option(None, minimum=1, help="checkpoint every K steps (resumable)")
    resume: bool = option(False, help="resume from the newest complete checkpoint in OUTPUT.checkpoints "
                                      "(none: start over)")
    fsdp: str | None = option(None, metavar="OPTIONS", help='shard with FSDP under torchrun, e.g. "full_shard '
                                                            'auto_wrap" (GPUs only; or use accelerate launch)')
    deepspeed: str | None = option(None, metavar="CONFIG", help="DeepSpeed config JSON, ZeRO stage 2 or 3, CPU or "
                                                                "GPU (or use accelerate launch)")
    no_shuffle: bool = option(False, help="train on windows in order (reproducible across launchers)")
    seed: int = option(42)
    merge: bool = option(False, help="also save the merged model (plain transformers)")
    log_steps: int = option(1, minimum=1)

    def fill_defaults(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [str(path) for path in self.data]

    def check(self) -> None:
        super().check()
        if not self.data:
            raise UsageError("--data: give at least one file")
        samples = self.steps * self.grad_accum * self.batch_size
        if samples > INT32_MAX:
            raise UsageError(f"--steps x --grad-accum x --batch-size must be <= {INT32_MAX} (2**31 - 1) windows, "
                             f"got {samples}")
        if self.fsdp and self.deepspeed:
            raise UsageError("--fsdp and --deepspeed exclude each other")
        if self.fsdp and not self.on_gpu():
            raise UsageError("--fsdp needs CUDA devices (the Trainer shards across accelerators only); "
                             "on the CPU, torchrun runs data-parallel (DDP) without it, or use --deepspeed")

    @property
    def group_size(self) -> int:
        """The preset's group size at the training context (:func:`~sinklora_ext.patterns.group_size_for`)."""
        return group_size_for(self.context, self.group_ratio)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(20, self.steps // 10)

    def run_settings(self) -> dict:
        """What a resumed run must share with the run that wrote its checkpoint."""
        return {name: getattr(self, name) for name in RUN_SETTINGS}


@dataclass
class CheckpointMeta:
    """``sinklora.json``, written beside a `sinklora train` adapter: how to rebuild its base model
    (the model, the context extension) and the attention preset it was trained with."""

    base_model: str | None
    context: int | None
    rope_factor: float | None = None
    original_context: int | None = None
    attn: str | None = None
    group_ratio: float | None = None
    sinks: int | None = None
    steps: int | None = None
    lr: float | None = None

    def extend_context(self, model) -> None:
        """Apply the run's RoPE interpolation to a freshly loaded base model."""
        if self.context:
            from .hf.lora import extend_context

            extend_context(model, int(self.context), self.original_context)

    def write(self, directory: Path) -> None:
        (Path(directory) / METADATA).write_text(json.dumps(asdict(self), indent=2))


def read_checkpoint_meta(directory, argument: str = "--adapter") -> CheckpointMeta | None:
    """The ``sinklora.json`` of an adapter directory, checked (None: not a `sinklora train` output)."""
    path = Path(directory).expanduser() / METADATA
    if not path.is_file():
        return None
    meta = read_json_file(path, argument)
    if not isinstance(meta, dict):
        raise UsageError(f"{argument}: {path} must hold a JSON object")
    for key in ("context", "original_context"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UsageError(f"{argument}: {path}: {key!r} must be an integer >= 1, got {value!r}")
    if not isinstance(meta.get("base_model"), (str, type(None))):
        raise UsageError(f"{argument}: {path}: 'base_model' must be a path or null")
    return CheckpointMeta(**{f.name: meta.get(f.name) for f in fields(CheckpointMeta)})


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


def check_inputs(config: TrainConfig) -> None:
    """The files a run reads and writes, checked before the model loads (the values were checked
    when the config was built)."""
    check_model_dir(config.model)
    check_output_dir(config.output)
    check_data(config.data)
    if config.deepspeed:
        _check_deepspeed(config.deepspeed)


def prepare_model(config: TrainConfig):
    """Load the base model, extend its context, wrap it for LoRA+ and select the pattern."""
    from .hf.attention import set_attention
    from .hf.lora import apply_lora_plus, extend_context
    from .hf.models import load_model

    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    factor = extend_context(model, config.context, config.original_context)
    model = apply_lora_plus(model, r=config.lora_r, alpha=config.lora_alpha)
    set_attention(model, config.attn, config.group_ratio, config.sinks, during="train", group_size=config.group_size)
    return model, tokenizer, factor


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


def _check_deepspeed(deepspeed: str) -> None:
    """--deepspeed fails here, with the rule, rather than deep inside the Trainer."""
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


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """The Trainer's ``checkpoint-STEP`` directories, oldest step first."""
    found = []
    for path in work_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def _resume_point(config: TrainConfig, work_dir: Path) -> Path | None:
    """The newest complete checkpoint of this run (None: start from the beginning); the main
    process removes the incomplete ones."""
    complete = []
    for step, path in _checkpoints(work_dir):
        if (path / CHECKPOINT_MARKER).is_file():
            complete.append((step, path))
        elif is_main_process():
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
    ours = config.run_settings()
    differ = [f"{flag(name)} {run.get(name)!r} there, {ours[name]!r} here" for name in RUN_SETTINGS
              if run.get(name) != ours[name]]
    if differ:
        raise UsageError(f"--resume: {path} was written by another run ({'; '.join(differ)})")
    if step > config.steps:
        raise UsageError(f"--steps ({config.steps}) must be >= the step of the checkpoint resumed ({step}, {path})")
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
                    fsync_tree(checkpoint)
                    pause_for_tests(checkpoint)
                    marker = checkpoint / (CHECKPOINT_MARKER + ".tmp")
                    with open(marker, "w") as f:
                        json.dump({"step": state.global_step, "run": settings}, f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(marker, checkpoint / CHECKPOINT_MARKER)
                    fsync(checkpoint)

        self.callback = Callback()


def train(config: TrainConfig) -> dict:
    """Run LoRA+ fine-tuning as ``config`` says; returns the run's summary (output, attn, context,
    rope_factor, steps, train_loss, first_loss, last_loss, losses [(step, loss)], windows)."""
    check_inputs(config)
    output = Path(config.output)
    work_dir = output.with_name(output.name + ".checkpoints")
    check_output_dir(work_dir, "--output (its checkpoints)")
    resume = _resume_point(config, work_dir) if config.resume else None
    if not config.resume and is_main_process() and _checkpoints(work_dir):
        print(f"sinklora: discarding the checkpoints of an earlier run in {work_dir} (no --resume)", file=sys.stderr)
        shutil.rmtree(work_dir)

    from transformers import Trainer, TrainingArguments

    torch.manual_seed(config.seed)
    model, tokenizer, factor = prepare_model(config)
    dataset = build_dataset(tokenizer, config.data, config.context, config.max_windows)
    from .data import collate_batch

    on_gpu = next(model.parameters()).is_cuda
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks anyway, without warning about it
    training_args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        warmup_steps=config.warmup,
        lr_scheduler_type="constant_with_warmup",
        logging_steps=config.log_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        **_checkpointing_arguments(TrainingArguments, not config.no_gradient_checkpointing),
        bf16=on_gpu and next(model.parameters()).dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        ddp_backend="gloo" if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        fsdp=config.fsdp or "",
        deepspeed=config.deepspeed,
        train_sampling_strategy="sequential" if config.no_shuffle else "random",
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    log = _LossLog()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate_batch(tokenizer),
                      callbacks=[log.callback, _MarkCompleteCheckpoints(config.run_settings()).callback])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    summary = {
        "output": str(output),
        "attn": config.attn,
        "context": config.context,
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
        save(model, tokenizer, output, config, factor, merge=config.merge, state_dict=state_dict)
    return summary


def save(model, tokenizer, output: Path, config: TrainConfig, factor: float, merge: bool = False,
         state_dict=None) -> None:
    """Write adapter + metadata (+ merged model) into a temp dir, fsync it, then move it into place
    (the temp dirs of killed runs are removed first).

    ``state_dict``: the full model state (gathered when training sharded it); default the model's own.
    The merged model is rebuilt from the saved adapter, so it never depends on sharded parameters."""
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        CheckpointMeta(base_model=config.model, context=config.context, rope_factor=factor,
                       original_context=config.original_context, attn=config.attn, group_ratio=config.group_ratio,
                       sinks=config.sinks, steps=config.steps, lr=config.lr).write(tmp)
        if merge:
            dtype = next(iter(base_model(model).parameters())).dtype
            trained, _ = load_trained(tmp, dtype=dtype, device="cpu")
            trained.merge_and_unload().save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")


def load_trained(output: str | Path, *, dtype=None, device=None):
    """Rebuild a `sinklora train` result: base model, its context extension, the adapter on top."""
    from .hf.lora import load_adapter
    from .hf.models import load_model

    meta = read_checkpoint_meta(output, "load_trained")
    if meta is None:
        raise MissingInput(f"load_trained: {output} has no {METADATA} (not a `sinklora train` output)")
    model, tokenizer = load_model(meta.base_model, dtype=dtype, device=device)
    meta.extend_context(model)
    return load_adapter(model, output), tokenizer


def summary(result: dict) -> str:
    """The human line of a run."""
    return (f"trained {result['steps']} steps with {result['attn']} at context {result['context']}: "
            f"loss {result['first_loss']} -> {result['last_loss']}; saved to {result['output']}")
