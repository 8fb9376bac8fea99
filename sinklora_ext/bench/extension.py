"""The SinkLoRA context-extension experiment: LoRA+ extend a model's context with each attention
preset (``--patterns``, names of patterns.PRESETS) on the same data, steps and seed, evaluate every
result at the target context with full attention on held-out text, and report each preset's
recovery ratio

    recovery = (ppl_base - ppl_preset) / (ppl_base - ppl_full)

``base`` is the model with the RoPE interpolation to the target context and no fine-tuning; ``full``
is the same fine-tuning with full attention. SinkLoRA (arXiv 2406.05678) reports 92% for SF-Attn
and 39% for S²-Attn. Defaults: the embedded SmolLM2-135M (8k) extended to 16k on a GPU; on the CPU,
a scaled-down run (1024 tokens, positions interpolated as if the model had been trained for 512).
Training text: the Debian Reference and the Bash manual; held-out text: the GNU Coding Standards.
Run: ``sinklora bench extension [--json]`` or ``python -m sinklora_ext.bench.extension``.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli.options import DeviceOptions, option
from ..patterns import PRESETS
from ..usage import UsageError, check_model_dir, check_output_dir

DEFAULT_PATTERNS = "full,sf,sf_nowrap,s2,s2_nowrap"
TRAIN_TEXTS = ("debian-reference", "bash-reference")
EVAL_TEXT = "gnu-standards"


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(kw_only=True)
class ExtensionBenchConfig(DeviceOptions):
    """`sinklora bench extension`; the context and steps left out default by device (filled in when
    built)."""

    model: str | None = option(None, help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    context: int | None = option(None, minimum=2, help="target context (default 16384 on a GPU, 1024 on CPU)")
    original_context: int | None = option(None, minimum=1,
                                          help="the context to extend from (default: the model's; 512 on the CPU)")
    patterns: str = option(DEFAULT_PATTERNS, help=f"comma-separated presets (default {DEFAULT_PATTERNS})")
    steps: int | None = option(None, minimum=1, help="LoRA+ steps per preset (default 200 on a GPU, 16 on CPU)")
    lr: float = option(2e-4, positive=True)
    batch_size: int = option(1, minimum=1)
    grad_accum: int = option(1, minimum=1)
    group_ratio: float = option(0.25, unit_interval=True)
    seed: int = option(42)
    train_text: list[str] = option(list(TRAIN_TEXTS), help="text files or Debian corpus names")
    eval_text: str = option(EVAL_TEXT, help="held-out text file or Debian corpus name")
    eval_windows: int = option(4, minimum=1, help="windows of --context tokens evaluated")
    max_windows: int | None = option(None, minimum=1, help="training windows used (default: all)")
    output: str | None = option(None, help="keep each preset's adapter under DIR/<preset>")
    no_progress: bool = option(False)

    def fill_defaults(self) -> None:
        gpu = self.on_gpu()
        if self.context is None:
            self.context = 16384 if gpu else 1024
            if not gpu and self.original_context is None:
                self.original_context = 512
        if self.steps is None:
            self.steps = 200 if gpu else 16

    @property
    def presets(self) -> list[str]:
        """The preset names of ``--patterns`` (each a name of patterns.PRESETS)."""
        return [p.strip() for p in self.patterns.split(",") if p.strip()]

    def check(self) -> None:
        super().check()
        presets = self.presets
        if not presets or any(p not in PRESETS for p in presets):
            raise UsageError(f"--patterns: each must be one of {sorted(PRESETS)}, got {self.patterns!r}")
        if "full" not in presets:
            raise UsageError("--patterns must include 'full': the recovery ratio is measured against it")

    def train_config(self, preset: str, output: Path, data: list[str]):
        """The `sinklora train` run of one preset."""
        from ..train import TrainConfig

        return TrainConfig(data=data, context=self.context, attn=preset, steps=self.steps, lr=self.lr,
                           group_ratio=self.group_ratio, seed=self.seed, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, output=str(output), log_steps=max(1, self.steps // 10),
                           model=self.model, original_context=self.original_context, max_windows=self.max_windows,
                           dtype=self.dtype, device=self.device)


def _eval(model, eval_ids: torch.Tensor, config: ExtensionBenchConfig) -> float:
    from ..evaluate import eval_ppl

    return eval_ppl(model, None, eval_ids, config.context, config.eval_windows, progress=not config.no_progress)["ppl"]


def run(config: ExtensionBenchConfig) -> dict:
    """The whole experiment; returns ``{"config", "base_ppl", "rows"}``."""
    from ..data import resolve_text_path, tokenize_file
    from ..evaluate import load_for_eval
    from ..hf.lora import extend_context, original_context
    from ..hf.models import load_model
    from ..train import train

    check_model_dir(config.model)
    if config.output is not None:
        check_output_dir(config.output)
    data = [str(resolve_text_path(t, "--train-text")) for t in config.train_text]
    eval_text = resolve_text_path(config.eval_text, "--eval-text")

    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    original = config.original_context or original_context(model.config)
    factor = extend_context(model, config.context, config.original_context)
    eval_ids = tokenize_file(tokenizer, eval_text)
    if eval_ids.numel() < config.context * config.eval_windows:
        raise UsageError(f"--eval-text has {eval_ids.numel()} tokens, fewer than --eval-windows "
                         f"({config.eval_windows}) x --context ({config.context})")
    print(f"base: {config.model or 'default'} with RoPE x{factor:g} ({original} -> {config.context}), no fine-tuning",
          file=sys.stderr)
    base_ppl = _eval(model, eval_ids, config)
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    _release()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(config.output) if config.output else Path(tmp)
        for preset in config.presets:
            out = root / preset
            print(f"[{preset}] LoRA+ {config.steps} steps at context {config.context}", file=sys.stderr)
            started = time.perf_counter()
            summary = train(config.train_config(preset, out, data))
            seconds = time.perf_counter() - started
            _release()
            model, _ = load_for_eval(config.model, out, dtype=config.dtype, device=config.device)
            ppl = _eval(model, eval_ids, config)
            del model
            _release()
            rows.append(dict(pattern=preset, ppl=ppl, first_loss=summary["first_loss"],
                             last_loss=summary["last_loss"], train_seconds=seconds))
            print(f"[{preset}] ppl {ppl:.4f} (base {base_ppl:.4f})", file=sys.stderr)
    full_ppl = next(r["ppl"] for r in rows if r["pattern"] == "full")
    gap = base_ppl - full_ppl
    for r in rows:
        r["recovery"] = (base_ppl - r["ppl"]) / gap if gap != 0 else None
    setup = dict(model=config.model or "default", device=device, dtype=dtype, original_context=original,
                  context=config.context, rope_factor=factor, steps=config.steps, lr=config.lr,
                  batch_size=config.batch_size, grad_accum=config.grad_accum, group_ratio=config.group_ratio,
                  seed=config.seed, train_text=[Path(d).name for d in data], eval_text=Path(eval_text).name,
                  eval_windows=config.eval_windows, torch=torch.__version__)
    return {"config": setup, "base_ppl": base_ppl, "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Context extension of {c['model']} ({c['dtype']}, {c['device']}): {c['original_context']} -> {c['context']} "
        f"tokens (RoPE x{c['rope_factor']:g}), {c['steps']} LoRA+ steps each (lr {c['lr']:g}, batch "
        f"{c['batch_size']}x{c['grad_accum']}), eval: {c['eval_windows']} windows of {c['eval_text']} "
        "with full attention",
        f"{'pattern':<12}{'ppl':>10}{'recovery':>10}{'loss first -> last':>22}{'train s':>9}",
        f"{'base':<12}{result['base_ppl']:>10.4f}{'0%':>10}{'-':>22}{'-':>9}",
    ]
    for r in result["rows"]:
        rec = "-" if r["recovery"] is None else f"{r['recovery']:.0%}"
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["first_loss"] is not None else "-"
        lines.append(f"{r['pattern']:<12}{r['ppl']:>10.4f}{rec:>10}{loss:>22}{r['train_seconds']:>9.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "extension", *sys.argv[1:]]))
