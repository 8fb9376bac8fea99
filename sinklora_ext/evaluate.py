"""Evaluation: perplexity on real text (``sinklora eval-ppl``) and passkey retrieval
(``sinklora eval-passkey``), SPEC §4.

``eval_ppl``: consecutive non-overlapping windows of ``N`` tokens from the start of the text (all
of them, or the first ``K``); ppl = exp(mean NLL of predicting tokens 1..N-1 of each window), the
mean taken over every predicted token of every window. The attention pattern is the caller's
choice (``--attn``): ``full`` is the model's stock causal attention; any other preset is switched
on for evaluation too (``set_attention(..., during="always")``).

``eval_passkey``: LongLoRA's passkey retrieval. A random 5-digit pass key is hidden at a relative
depth inside repeated filler text; the model greedy-decodes the answer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .patterns import PRESETS
from .usage import (UsageError, at_least, check_adapter_dir, check_block_size, check_device, check_model_dir,
                    in_unit_interval)

__all__ = [
    "eval_ppl",
    "window_nll",
    "eval_passkey",
    "passkey_prompt",
    "add_model_arguments",
    "add_eval_ppl_arguments",
    "run_eval_ppl",
    "add_eval_passkey_arguments",
    "run_eval_passkey",
    "load_for_eval",
]

# eval-passkey lengths past this many times the model's context are refused: the prompt is built
# and tokenized whole, and no model retrieves that far past its positions
PASSKEY_MAX_CONTEXTS = 4
_LOSS_CHUNK = 1024  # positions per lm_head + cross-entropy chunk (bounds the [chunk, vocab] logits)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def _check_context(model, context: int) -> None:
    limit = _max_positions(model)
    if limit is not None and context > limit:
        warnings.warn(
            f"context {context} is longer than the model's max_position_embeddings ({limit}); positions "
            "past it were never trained unless the RoPE was extended (sinklora train does that)",
            stacklevel=3,
        )


def _split_head(model):
    """(decoder, lm_head) when the model's logits are exactly lm_head(decoder(x).last_hidden_state)
    (LLaMA and its kin), so the loss can be computed chunk by chunk without the [N, vocab] logits.
    None otherwise."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3", "smollm3"):
        return None
    return decoder, head


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed float32 NLL of predicting tokens 1..N-1 of each row of ``input_ids [B, N]``: ``[B]``.

    Same arithmetic as transformers' causal LM loss (logits upcast to float32, cross-entropy on
    the shifted labels), only in chunks of positions to bound memory.
    """
    targets = input_ids[:, 1:]
    split = _split_head(model)
    if split is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        return _nll_sum(logits, targets)
    decoder, head = split
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    total = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    for start in range(0, hidden.shape[1], _LOSS_CHUNK):
        total += _nll_sum(head(hidden[:, start:start + _LOSS_CHUNK]), targets[:, start:start + _LOSS_CHUNK])
    return total


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row summed cross-entropy of ``logits [B, n, V]`` against ``targets [B, n]``, in float32.

    The classes stay on the last dimension: on the CPU, torch's log-softmax over a non-last
    dimension (``cross_entropy(logits.transpose(1, 2), ...)``) is off by ~1e-4 nats per token.
    """
    b, n, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * n, v).float(), targets.reshape(b * n), reduction="none")
    return nll.view(b, n).sum(dim=1)


def eval_ppl(model, tokenizer, text_path, context: int, max_windows: int | None = None, batch_size: int = 1,
             progress: bool = True) -> dict:
    """Perplexity of ``model`` on the text file at ``text_path`` (or a 1-D token tensor).

    Windows: ``tokens[i*N:(i+1)*N]`` for ``i < min(len // N, max_windows)``. Returns
    ``{"ppl", "nll" (mean per token), "tokens" (predicted tokens: windows * (N - 1)), "windows",
    "context"}``. The model runs in eval mode under ``torch.no_grad``.
    """
    from .data import tokenize_file

    if context < 2:
        raise UsageError(f"context must be >= 2 tokens, got {context}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be >= 1, got {max_windows}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    tokens = text_path if isinstance(text_path, torch.Tensor) else tokenize_file(tokenizer, text_path)
    tokens = tokens.reshape(-1).long()
    available = tokens.numel() // context
    if available == 0:
        raise UsageError(f"the text has {tokens.numel()} tokens, fewer than one window of context={context}")
    windows = available if max_windows is None else min(available, max_windows)
    _check_context(model, context)

    from tqdm.auto import tqdm

    device = _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad(), tqdm(total=windows, desc=f"eval-ppl N={context}", unit="win", disable=not progress,
                                   file=sys.stderr) as bar:
            for start in range(0, windows, batch_size):
                n = min(batch_size, windows - start)
                batch = tokens[start * context:(start + n) * context].view(n, context).to(device)
                total += window_nll(model, batch).double().sum().item()
                bar.update(n)
                predicted = (start + n) * (context - 1)
                bar.set_postfix(ppl=f"{math.exp(total / predicted):.3f}")
    finally:
        model.train(was_training)
    predicted = windows * (context - 1)
    nll = total / predicted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": predicted, "windows": windows, "context": context}


# ----------------------------------------------------------------------------------------------
# Passkey retrieval (LongLoRA's passkey_retrivial.py, with the length in tokens and a fixed depth)
# ----------------------------------------------------------------------------------------------

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FINAL_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key: int | str, n_filler: int, depth: float) -> str:
    """The prompt with ``n_filler`` filler sentences groups, the key line after ``round(depth *
    n_filler)`` of them."""
    before = round(depth * n_filler)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([
        TASK_DESCRIPTION,
        " ".join([FILLER] * before),
        info,
        " ".join([FILLER] * (n_filler - before)),
        FINAL_QUESTION,
    ])


def _fit_filler(tokenizer, length: int, depth: float) -> int:
    """The most filler repetitions whose prompt has at most ``length`` tokens."""
    def size(n):
        return len(tokenizer(passkey_prompt(12345, n, depth), verbose=False).input_ids)

    base = size(0)
    if base > length:
        raise UsageError(f"length {length} is shorter than the passkey prompt without filler ({base} tokens)")
    per = max(1.0, (size(20) - base) / 20)
    n = max(0, int((length - base) / per))
    while n > 0 and size(n) > length:
        n -= 1
    while size(n + 1) <= length:
        n += 1
    return n


@torch.no_grad()
def eval_passkey(model, tokenizer, length: int, depth: float = 0.5, trials: int = 10, seed: int = 0,
                 progress: bool = True) -> dict:
    """Passkey retrieval accuracy at a prompt of about ``length`` tokens (at most ``length``).

    Each trial draws a 5-digit key (``random.Random(seed)``), hides it at relative ``depth`` (0 =
    right after the task description, 1 = right before the question), greedy-decodes a few tokens
    and counts the trial correct when the first number in the answer is the key.
    """
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth must be in [0, 1], got {depth}")
    if trials < 1:
        raise UsageError(f"trials must be >= 1, got {trials}")
    n_filler = _fit_filler(tokenizer, length, depth)
    _check_context(model, length)
    rng = random.Random(seed)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct, sizes, answers = 0, [], []
    from tqdm.auto import tqdm

    try:
        for _ in tqdm(range(trials), desc=f"eval-passkey L={length}", unit="trial", disable=not progress,
                      file=sys.stderr):
            key = rng.randint(10000, 99999)
            prompt = passkey_prompt(key, n_filler, depth)
            ids = tokenizer(prompt, return_tensors="pt", verbose=False).input_ids.to(device)
            sizes.append(ids.shape[1])
            new = len(tokenizer(f" {key}.", add_special_tokens=False).input_ids) + 2
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            found = re.search(r"\d+", answer)
            ok = found is not None and found.group(0) == str(key)
            correct += ok
            answers.append({"key": key, "answer": answer.strip(), "correct": ok})
    finally:
        model.train(was_training)
    return {
        "accuracy": correct / trials,
        "correct": correct,
        "trials": trials,
        "length": length,
        "tokens": round(sum(sizes) / len(sizes)),
        "depth": depth,
        "seed": seed,
        "answers": answers,
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter directory (a `sinklora train` output or any peft adapter) loaded on top")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attn", default="full", choices=sorted(PRESETS),
                        help="attention pattern used during evaluation (default: full)")
    parser.add_argument("--group-ratio", type=float, default=0.25, help="group size / context (default 0.25)")
    parser.add_argument("--sinks", type=int, default=None,
                        help="sink tokens (default: the preset's, 4 for sf and sf_nowrap, 0 for s2)")


def add_eval_ppl_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``sinklora eval-ppl --text FILE --context N --attn PRESET [--group-ratio 0.25] [--sinks 4]
    [--max-windows K] [--model PATH] [--adapter DIR] [--dtype] [--device] [--batch-size B] [--json]``"""
    parser.add_argument("--text", required=True,
                        help="UTF-8 text file, or a Debian corpus name "
                             "(debian-reference, gnu-standards, bash-reference)")
    parser.add_argument("--context", type=int, required=True, help="window length N in tokens")
    _add_attention_arguments(parser)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    add_model_arguments(parser)
    return parser


def add_eval_passkey_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``sinklora eval-passkey --length N [--depth 0.5] [--trials K] [--seed S] [--model] [--adapter] [--json]``"""
    parser.add_argument("--length", type=int, required=True, help="prompt length in tokens (at most)")
    parser.add_argument("--depth", type=float, default=0.5, help="relative position of the key, 0..1 (default 0.5)")
    parser.add_argument("--trials", type=int, default=10, help="number of keys tried (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    _add_attention_arguments(parser)
    add_model_arguments(parser)
    return parser


def load_for_eval(model_path=None, adapter=None, *, dtype=None, device=None):
    """The model (adapter merged in, context extension of a `sinklora train` output applied) and
    its tokenizer, in eval mode."""
    from .hf.models import load_model

    meta = check_adapter_eval_inputs(model_path, adapter)
    if model_path is None:
        model_path = meta.get("base_model")
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    if adapter is not None:
        if meta.get("context"):
            from .hf.lora import extend_context

            extend_context(model, int(meta["context"]), meta.get("original_context"))
        model = load_adapter(model, adapter).merge_and_unload()
        model.eval()
    return model, tokenizer


def check_adapter_eval_inputs(model_path, adapter) -> dict:
    """``--model`` and ``--adapter`` checked before anything loads; the adapter's `sinklora train`
    metadata ({} without one)."""
    check_model_dir(model_path)
    if adapter is None:
        return {}
    meta = check_adapter_dir(adapter)  # sinklora.json, written by `sinklora train`
    if model_path is None and meta.get("base_model") is not None:
        check_model_dir(meta["base_model"], f"--adapter {adapter}: its base model (sinklora.json)")
    return meta


def load_adapter(model, adapter):
    """``PeftModel.from_pretrained`` that refuses an adapter of another base model or rank: every
    tensor of the adapter file must be one of the model's adapter tensors, with its shape, and the
    other way round (peft alone would load a partial match with a warning)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError) as e:  # size mismatches, target modules the model lacks
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else repr(e))
        raise UsageError(f"--adapter: {adapter} does not fit the base model (another model or rank?): {reason}") \
            from None
    weights = Path(adapter) / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            saved = set(f.keys())
        expected = set(get_peft_model_state_dict(peft_model))
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            example = f"e.g. {(missing or extra)[0]}"
            raise UsageError(f"--adapter: {adapter} does not fit the base model (another model?): {len(missing)} of "
                             f"the model's adapter tensors are not in it, {len(extra)} of its tensors are not in the "
                             f"model ({example})")
    return peft_model


def _check_attention_arguments(args) -> None:
    in_unit_interval(args, "group_ratio")
    at_least(args, 0, "sinks")
    check_device(args.device)
    check_adapter_eval_inputs(args.model, args.adapter)


def _apply_attention(model, args) -> None:
    if args.attn == "full":
        return
    from .hf.attention import set_attention

    set_attention(model, args.attn, args.group_ratio, args.sinks, during="always")


def _finish(result: dict, args, line: str) -> dict:
    print(line, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return result


def run_eval_ppl(args) -> dict:
    """``sinklora eval-ppl``: prints a summary line, and with ``--json`` the result as the last line."""
    from .data import resolve_text_path, tokenize_file

    at_least(args, 2, "context")
    at_least(args, 1, "max_windows", "batch_size")
    _check_attention_arguments(args)
    text = resolve_text_path(args.text)
    started = time.perf_counter()
    model, tokenizer = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
    _apply_attention(model, args)
    tokens = tokenize_file(tokenizer, text)
    if tokens.numel() < args.context:
        raise UsageError(f"--text: {text} has {tokens.numel()} tokens, fewer than one window of --context "
                         f"{args.context}")
    result = eval_ppl(model, tokenizer, tokens, args.context, args.max_windows, args.batch_size,
                      progress=not args.no_progress)
    result.update(
        attn=args.attn,
        group_ratio=args.group_ratio if args.attn != "full" else None,
        sinks=None if args.attn == "full" else (args.sinks if args.sinks is not None else PRESETS[args.attn].num_sinks),
        text=str(text),
        model=args.model or "default",
        adapter=args.adapter,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        seconds=round(time.perf_counter() - started, 2),
    )
    line = (f"ppl {result['ppl']:.4f} over {result['tokens']} predicted tokens "
            f"({result['windows']} windows of {args.context}, attn {args.attn})")
    return _finish(result, args, line)


def add_kv_policy_arguments(parser: argparse.ArgumentParser, policy_default: str = "h2o") -> None:
    parser.add_argument("--policy", default=policy_default, choices=["full", "h2o", "streaming"],
                        help="KV cache policy (full never evicts)")
    parser.add_argument("--kv-budget", type=int, default=None,
                        help="tokens kept per (layer, kv head): sinks + recent + heavy hitters")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens never evicted (default 4)")
    parser.add_argument("--recent", type=int, default=None, help="recent tokens never evicted (default: budget / 2)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")


def kv_policy(args):
    """The cache policy of ``--policy``, ``--kv-budget``, ``--sinks``, ``--recent``, checked."""
    from .kv_cache import CachePolicy

    at_least(args, 1, "kv_budget")
    at_least(args, 0, "sinks", "recent")
    check_block_size(args)
    if args.policy == "full" and (args.kv_budget is not None or args.recent is not None):
        given = "--kv-budget" if args.kv_budget is not None else "--recent"
        raise UsageError(f"{given} applies to --policy h2o or streaming; --policy full keeps every token")
    if args.policy == "streaming" and args.recent is not None:
        raise UsageError("--recent applies to --policy h2o; streaming keeps --kv-budget - --sinks recent tokens")
    if args.policy != "full":
        if args.kv_budget is None:
            raise UsageError(f"--kv-budget is required with --policy {args.policy}")
        recent = args.recent if args.recent is not None else args.kv_budget // 2
        if args.policy == "h2o" and args.kv_budget < args.sinks + recent:
            raise UsageError(f"--kv-budget ({args.kv_budget}) must be >= --sinks ({args.sinks}) + --recent ({recent})")
        if args.policy == "streaming" and args.kv_budget < args.sinks:
            raise UsageError(f"--kv-budget ({args.kv_budget}) must be >= --sinks ({args.sinks})")
    return CachePolicy(args.policy, args.kv_budget, args.sinks, args.recent)


def add_eval_kv_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``sinklora eval-kv --text FILE --context N --policy {full,h2o,streaming} --kv-budget TOKENS
    [--sinks 4] [--recent TOKENS] [--prefill TOKENS] [--json]``"""
    parser.add_argument("--text", required=True, help="UTF-8 text file, or a Debian corpus name")
    parser.add_argument("--context", type=int, required=True, help="evaluate the first N tokens")
    parser.add_argument("--prefill", type=int, default=None, help="prompt tokens before decoding (default: budget)")
    add_kv_policy_arguments(parser, policy_default="h2o")
    add_model_arguments(parser)
    return parser


def run_eval_kv(args) -> dict:
    """``sinklora eval-kv``: teacher-forced decoding through the paged cache under a policy."""
    from .data import resolve_text_path, tokenize_file

    at_least(args, 2, "context")
    at_least(args, 1, "prefill")
    policy = kv_policy(args)
    check_device(args.device)
    check_adapter_eval_inputs(args.model, args.adapter)
    text = resolve_text_path(args.text)
    from .engine import teacher_forced_nll

    started = time.perf_counter()
    model, tokenizer = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
    ids = tokenize_file(tokenizer, text)[: args.context].to(next(model.parameters()).device)
    if ids.shape[0] < args.context:
        raise UsageError(f"--text: {text} has only {ids.shape[0]} tokens, fewer than --context {args.context}")
    prefill = args.prefill if args.prefill is not None else (args.kv_budget or args.context)
    nll, stats = teacher_forced_nll(model, ids, policy, prefill, args.block_size, progress=not args.no_progress)
    full_blocks = -(-args.context // args.block_size)
    result = dict(ppl=math.exp(float(nll.double().mean())), tokens=int(nll.numel()), policy=args.policy,
                  kv_budget=args.kv_budget, sinks=args.sinks, recent=policy.recent_tokens if policy.evicts else None,
                  prefill=min(prefill, args.context), context=args.context, full_cache_blocks=full_blocks, **stats,
                  model=args.model or "default", adapter=args.adapter,
                  seconds=round(time.perf_counter() - started, 2))
    line = (f"ppl {result['ppl']:.4f} over {result['tokens']} tokens, policy {args.policy}"
            f"{'' if not policy.evicts else f' (budget {args.kv_budget})'}: {stats['kv_blocks']} KV blocks per "
            f"layer vs {full_blocks} for a full cache")
    return _finish(result, args, line)


def run_eval_passkey(args) -> dict:
    """``sinklora eval-passkey``: prints a summary line, and with ``--json`` the result as the last line."""
    at_least(args, 1, "length", "trials")
    if not 0.0 <= args.depth <= 1.0:
        raise UsageError(f"--depth must be in [0, 1], got {args.depth}")
    _check_attention_arguments(args)
    started = time.perf_counter()
    model, tokenizer = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
    limit = _max_positions(model)
    if limit is not None and args.length > PASSKEY_MAX_CONTEXTS * limit:
        raise UsageError(f"--length must be <= {PASSKEY_MAX_CONTEXTS} x the model's context ({limit} tokens), "
                         f"got {args.length}")
    _apply_attention(model, args)
    result = eval_passkey(model, tokenizer, args.length, args.depth, args.trials, args.seed,
                          progress=not args.no_progress)
    result.update(attn=args.attn, model=args.model or "default", adapter=args.adapter,
                  seconds=round(time.perf_counter() - started, 2))
    line = (f"passkey accuracy {result['accuracy']:.2f} ({result['correct']}/{result['trials']}) "
            f"at {result['tokens']} tokens, depth {args.depth}")
    return _finish(result, args, line)
