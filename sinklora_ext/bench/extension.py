"""The SinkLoRA context-extension experiment: LoRA+ extend a model's context with each attention
pattern on the same data, steps and seed, evaluate every result at the target context with full
attention on held-out text, and report each pattern's recovery ratio

    recovery = (ppl_base - ppl_pattern) / (ppl_base - ppl_full)

``base`` is the model with the RoPE interpolation to the target context and no fine-tuning; ``full``
is the same fine-tuning with full attention. SinkLoRA (arXiv 2406.05678) reports 92% for SF-Attn
and 39% for S²-Attn. Defaults: the embedded SmolLM2-135M (8k) extended to 16k on a GPU; on the CPU,
a scaled-down run (1024 tokens, positions interpolated as if the model had been trained for 512).
Training text: the Debian Reference and the Bash manual; held-out text: the GNU Coding Standards.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import report
from ..patterns import PRESETS
from ..usage import (UsageError, at_least, check_device, check_model_dir, check_output_dir, in_unit_interval,
                    positive_finite)

DEFAULT_PATTERNS = "full,sf,sf_nowrap,s2,s2_nowrap"
TRAIN_TEXTS = ("debian-reference", "bash-reference")
EVAL_TEXT = "gnu-standards"


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_args(args, pattern: str, output: Path, data: list[str]) -> argparse.Namespace:
    from ..train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--data", *data, "--context", str(args.context), "--attn", pattern, "--steps", str(args.steps),
            "--lr", str(args.lr), "--group-ratio", str(args.group_ratio), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--output", str(output),
            "--log-steps", str(max(1, args.steps // 10))]
    for flag, value in (("--model", args.model), ("--original-context", args.original_context),
                        ("--max-windows", args.max_windows), ("--dtype", args.dtype), ("--device", args.device)):
        if value is not None:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def _eval(model, eval_ids: torch.Tensor, args) -> float:
    from ..evaluate import eval_ppl

    return eval_ppl(model, None, eval_ids, args.context, args.eval_windows, progress=not args.no_progress)["ppl"]


def run(args) -> dict:
    from ..data import resolve_text_path, tokenize_file
    from ..evaluate import load_for_eval
    from ..hf.lora import extend_context, original_context
    from ..hf.models import load_model
    from ..train import train

    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = [p for p in patterns if p not in PRESETS]
    if unknown or not patterns:
        raise UsageError(f"--patterns: each must be one of {sorted(PRESETS)}, got {args.patterns!r}")
    if "full" not in patterns:
        raise UsageError("--patterns must include 'full': the recovery ratio is measured against it")
    data = [str(resolve_text_path(t, "--train-text")) for t in args.train_text]
    eval_text = resolve_text_path(args.eval_text, "--eval-text")

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    original = args.original_context or original_context(model.config)
    factor = extend_context(model, args.context, args.original_context)
    eval_ids = tokenize_file(tokenizer, eval_text)
    if eval_ids.numel() < args.context * args.eval_windows:
        raise UsageError(f"--eval-text has {eval_ids.numel()} tokens, fewer than --eval-windows "
                         f"({args.eval_windows}) x --context ({args.context})")
    print(f"base: {args.model or 'default'} with RoPE x{factor:g} ({original} -> {args.context}), no fine-tuning",
          file=sys.stderr)
    base_ppl = _eval(model, eval_ids, args)
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    _release()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.output) if args.output else Path(tmp)
        for pattern in patterns:
            out = root / pattern
            print(f"[{pattern}] LoRA+ {args.steps} steps at context {args.context}", file=sys.stderr)
            started = time.perf_counter()
            summary = train(_train_args(args, pattern, out, data))
            seconds = time.perf_counter() - started
            _release()
            model, _ = load_for_eval(args.model, out, dtype=args.dtype, device=args.device)
            ppl = _eval(model, eval_ids, args)
            del model
            _release()
            rows.append(dict(pattern=pattern, ppl=ppl, first_loss=summary["first_loss"],
                             last_loss=summary["last_loss"], train_seconds=seconds))
            print(f"[{pattern}] ppl {ppl:.4f} (base {base_ppl:.4f})", file=sys.stderr)
    full_ppl = next(r["ppl"] for r in rows if r["pattern"] == "full")
    gap = base_ppl - full_ppl
    for r in rows:
        r["recovery"] = (base_ppl - r["ppl"]) / gap if gap != 0 else None
    config = dict(model=args.model or "default", device=device, dtype=dtype, original_context=original,
                  context=args.context, rope_factor=factor, steps=args.steps, lr=args.lr,
                  batch_size=args.batch_size, grad_accum=args.grad_accum, group_ratio=args.group_ratio,
                  seed=args.seed, train_text=[Path(d).name for d in data], eval_text=Path(eval_text).name,
                  eval_windows=args.eval_windows, torch=torch.__version__)
    return {"config": config, "base_ppl": base_ppl, "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Context extension of {c['model']} ({c['dtype']}, {c['device']}): {c['original_context']} -> {c['context']} "
        f"tokens (RoPE x{c['rope_factor']:g}), {c['steps']} LoRA+ steps each (lr {c['lr']:g}, batch "
        f"{c['batch_size']}x{c['grad_accum']}), eval: {c['eval_windows']} windows of {c['eval_text']} with full attention",
        f"{'pattern':<12}{'ppl':>10}{'recovery':>10}{'loss first -> last':>22}{'train s':>9}",
        f"{'base':<12}{result['base_ppl']:>10.4f}{'0%':>10}{'-':>22}{'-':>9}",
    ]
    for r in result["rows"]:
        rec = "-" if r["recovery"] is None else f"{r['recovery']:.0%}"
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["first_loss"] is not None else "-"
        lines.append(f"{r['pattern']:<12}{r['ppl']:>10.4f}{rec:>10}{loss:>22}{r['train_seconds']:>9.0f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--context", type=int, default=None, help="target context (default 16384 on a GPU, 1024 on CPU)")
    p.add_argument("--original-context", type=int, default=None,
                   help="the context to extend from (default: the model's; 512 on the CPU)")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help=f"comma-separated presets (default {DEFAULT_PATTERNS})")
    p.add_argument("--steps", type=int, default=None, help="LoRA+ steps per pattern (default 200 on a GPU, 16 on CPU)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--group-ratio", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-text", nargs="+", default=list(TRAIN_TEXTS), help="text files or Debian corpus names")
    p.add_argument("--eval-text", default=EVAL_TEXT, help="held-out text file or Debian corpus name")
    p.add_argument("--eval-windows", type=int, default=4, help="windows of --context tokens evaluated")
    p.add_argument("--max-windows", type=int, default=None, help="training windows used (default: all)")
    p.add_argument("--output", default=None, help="keep each pattern's adapter under DIR/<pattern>")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def main(args) -> dict:
    gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if args.context is None:
        args.context = 16384 if gpu else 1024
        if not gpu and args.original_context is None:
            args.original_context = 512
    if args.steps is None:
        args.steps = 200 if gpu else 16
    at_least(args, 2, "context")
    at_least(args, 1, "steps", "eval_windows", "batch_size", "grad_accum", "max_windows", "original_context")
    in_unit_interval(args, "group_ratio")
    positive_finite(args, "lr")
    check_device(args.device)
    check_model_dir(args.model)
    if args.output is not None:
        check_output_dir(args.output)
    return report(run(args), format_table, args.json)
