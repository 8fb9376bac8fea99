"""`sinklora train`: LoRA+ context-extension fine-tuning with an SF-Attn / S²-Attn pattern (SPEC §2, §4).

Runs on the Hugging Face Trainer, so one CPU, one GPU, ``torchrun`` and ``accelerate launch`` (DDP,
FSDP, DeepSpeed) all work; gradient checkpointing, bf16 on GPU, progress bars and resumable
checkpoints come with it. Output: a peft adapter (LoRA + embeddings + norms) plus
``sinklora.json`` (how to rebuild the base: model, context extension, pattern); ``--merge`` also
writes a plain transformers checkpoint. The output directory is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .patterns import PRESETS

METADATA = "sinklora.json"


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
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
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

    sets = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data: no such file: {path}")
        if path.endswith(".json"):
            sets.append(data.LongAlpacaDataset(tokenizer, path, context))
        else:
            sets.append(data.PackedTextDataset(tokenizer, [path], context))
    dataset = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)
    if max_windows is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_windows, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"--data: no training window of {context} tokens in {paths}")
    return dataset


def prepare_model(args):
    """Load the base model, extend its context, wrap it for LoRA+ and select the pattern."""
    from .hf_attention import set_attention
    from .lora import apply_lora_plus, extend_context
    from .models import load_model

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
        raise ValueError("--fsdp and --deepspeed exclude each other")
    gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if fsdp and not gpu:
        raise ValueError("--fsdp needs CUDA devices (the Trainer shards across accelerators only); "
                         "on the CPU, torchrun runs data-parallel (DDP) without it, or use --deepspeed")
    if not deepspeed:
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ModuleNotFoundError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    if not Path(deepspeed).is_file():
        raise FileNotFoundError(f"--deepspeed: no such config file: {deepspeed}")
    try:
        config = json.loads(Path(deepspeed).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed: {deepspeed} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed: {deepspeed} must hold a JSON object")


def _gathered_state_dict(trainer) -> dict | None:
    """The full model state on rank 0, gathered from the shards under FSDP or ZeRO-3. A collective:
    every rank calls it."""
    wrapped = trainer.model_wrapped
    if trainer.is_deepspeed_enabled and wrapped.zero_optimization_stage() == 3:
        # what accelerate calls, without its demand for stage3_gather_16bit_weights_on_model_save
        return wrapped._zero3_consolidated_16bit_state_dict()
    return trainer.accelerator.get_state_dict(wrapped)


def train(args) -> dict:
    from transformers import Trainer, TrainingArguments

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.context < 2:
        raise ValueError(f"--context must be >= 2, got {args.context}")
    _check_sharding(args)
    torch.manual_seed(args.seed)
    model, tokenizer, factor = prepare_model(args)
    dataset = build_dataset(tokenizer, args.data, args.context, args.max_windows)
    from .data import collate_batch

    on_gpu = next(model.parameters()).is_cuda
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks anyway, without warning about it
    output = Path(args.output)
    work_dir = output.with_name(output.name + ".checkpoints")
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
                      callbacks=[log.callback])
    resume = args.resume and any(work_dir.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)

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
    """Write adapter + metadata (+ merged model) into a temp dir, then move it into place.

    ``state_dict``: the full model state (gathered when training sharded it); default the model's own.
    The merged model is rebuilt from the saved adapter, so it never depends on sharded parameters."""
    output.parent.mkdir(parents=True, exist_ok=True)
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
        if output.exists():
            backup = output.with_name(output.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(output, backup)
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_trained(output: str | Path, *, dtype=None, device=None):
    """Rebuild a `sinklora train` result: base model, its context extension, the adapter on top."""
    from peft import PeftModel

    from .lora import extend_context
    from .models import load_model

    output = Path(output)
    meta = json.loads((output / METADATA).read_text())
    model, tokenizer = load_model(meta["base_model"], dtype=dtype, device=device)
    extend_context(model, meta["context"], meta.get("original_context"))
    return PeftModel.from_pretrained(model, output), tokenizer


def main(args) -> dict:
    summary = train(args)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        print(f"trained {summary['steps']} steps with {summary['attn']} at context {summary['context']}: "
              f"loss {summary['first_loss']} -> {summary['last_loss']}; saved to {summary['output']}")
        if args.json:
            print(json.dumps(summary))
    return summary
