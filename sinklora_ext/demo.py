"""`sinklora demo` (what `make demo` runs): the whole story on the embedded default model.

1. LoRA+ fine-tune SmolLM2-135M with SF-Attn on real long text (a short run).
2. Decode held-out text through the paged cache with the fine-tuned model under the `full`, `h2o`,
   `streaming` and the recommended (`ema`) policies at a quarter of the context, side by side:
   perplexity, KV memory (blocks per layer vs a full cache) and tokens/s.
3. Answer a question with the recommended policy's cache.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli.options import Config, option
from .usage import UsageError, check_output_dir

DEMO_SINKS = 4


@dataclass(kw_only=True)
class DemoConfig(Config):
    """What `sinklora demo` takes; each field is the flag of its name."""

    context: int = option(512, minimum=2, help="training and evaluation context (default 512)")
    steps: int = option(12, minimum=1, help="fine-tuning steps (default 12)")
    lr: float = option(1e-4, positive=True, help="LoRA+ learning rate (default 1e-4)")
    kv_budget: int | None = option(None, help="default: a quarter of the context")
    output: str | None = option(None, help="keep the adapter here (default: a temporary directory)")

    @property
    def budget(self) -> int:
        return self.kv_budget if self.kv_budget is not None else self.context // 4

    def check(self) -> None:
        super().check()
        # h2o keeps DEMO_SINKS sinks + budget // 2 recent tokens
        if not 2 * DEMO_SINKS <= self.budget <= self.context:
            raise UsageError(f"--kv-budget must be in [{2 * DEMO_SINKS}, --context {self.context}] (the default is "
                             f"a quarter of the context), got {self.budget}")


def demo(config: DemoConfig) -> dict:
    """Run the three steps (printing them); returns the report (train losses, base_ppl, one row per
    policy, kv_budget, context, generated text)."""
    if config.output is not None:
        check_output_dir(config.output)
    budget = config.budget

    from .data import debian_text_file, tokenize_file
    from .engine import DecodeEngine, Request, teacher_forced_nll
    from .evaluate import load_for_eval, window_nll
    from .generate import chat_prompt_ids
    from .kv_cache import RECOMMENDED_POLICY, CachePolicy
    from .train import TrainConfig, train

    torch.manual_seed(0)
    text = debian_text_file()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(config.output or Path(tmp) / "adapter")
        print(f"[1/3] LoRA+ fine-tuning with SF-Attn: {config.steps} steps at context {config.context} on "
              f"{text.name}")
        summary = train(TrainConfig(data=[str(text)], context=config.context, attn="sf", steps=config.steps,
                                    lr=config.lr, max_windows=16, output=str(out_dir), no_shuffle=True))
        print(f"      loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; adapter saved")

        base, tokenizer = load_for_eval(None, None)
        ids = tokenize_file(tokenizer, text)
        held_out = ids[-config.context:].to(next(base.parameters()).device)  # training used the first windows
        with torch.no_grad():  # one dense forward: what the full cache gives, token for token
            base_ppl = math.exp(float(window_nll(base, held_out[None])[0]) / (held_out.numel() - 1))
        del base
        model, tokenizer = load_for_eval(None, out_dir)
        print(f"[2/3] teacher-forced decoding of {config.context} held-out tokens through the paged cache "
              f"(prefill {budget}, budget {budget} = 1/4 of the context); before fine-tuning: ppl {base_ppl:.3f}")
        rows = []
        for name in ("full", "h2o", "streaming", RECOMMENDED_POLICY):
            policy = CachePolicy(name, None if name == "full" else budget, DEMO_SINKS)
            nll, stats = teacher_forced_nll(model, held_out, policy, prefill=budget)
            rows.append(dict(policy=name, ppl=math.exp(float(nll.double().mean())), kv_blocks=stats["kv_blocks"],
                             tokens_per_s=stats["tokens_per_s"]))
        full_blocks = rows[0]["kv_blocks"]
        print(f"      {'policy':<10}{'ppl':>9}{'KV blocks/layer':>17}{'of full':>9}{'tokens/s':>10}")
        for r in rows:
            print(f"      {r['policy']:<10}{r['ppl']:>9.3f}{r['kv_blocks']:>17}{r['kv_blocks'] / full_blocks:>9.0%}"
                  f"{r['tokens_per_s']:>10.1f}")

        question = "What is the Debian package manager called, and what does it do?"
        print(f"[3/3] answering with the {RECOMMENDED_POLICY} cache (budget 32): {question!r}")
        prompt_ids = chat_prompt_ids(tokenizer, question)
        engine = DecodeEngine(model, CachePolicy(RECOMMENDED_POLICY, 32, DEMO_SINKS), max_seqs=1, max_tokens=128)
        (req,) = engine.run([Request(prompt_ids, 48, stop_ids=(tokenizer.eos_token_id,))])
        print("      " + tokenizer.decode(req.output_ids, skip_special_tokens=True).strip().replace("\n", "\n      "))
    return dict(train=dict(first_loss=summary["first_loss"], last_loss=summary["last_loss"], steps=summary["steps"]),
                base_ppl=base_ppl, kv=rows, kv_budget=budget, context=config.context,
                generated=tokenizer.decode(req.output_ids))
