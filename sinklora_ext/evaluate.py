"""Evaluation: perplexity on real text (``sinklora eval-ppl``), passkey retrieval
(``sinklora eval-passkey``) and perplexity through the paged cache (``sinklora eval-kv``); the
rules are in docs/cli.md.

Two levels: :func:`eval_ppl` / :func:`eval_passkey` take a loaded model; :func:`run_eval_ppl`,
:func:`run_eval_passkey`, :func:`run_eval_kv` take a config (:class:`EvalPplConfig`,
:class:`PasskeyConfig`, :class:`EvalKVConfig`, whose fields are the commands' flags), load the
model (:func:`load_for_eval`: adapter merged, a `sinklora train` output's context extension
applied) and return the result dict the command prints.

``eval_ppl``: consecutive non-overlapping windows of ``N`` tokens from the start of the text (all
of them, or the first ``K``); ppl = exp(mean NLL of predicting tokens 1..N-1 of each window), the
mean taken over every predicted token of every window. The attention preset is the caller's
choice (``--attn``, a name of patterns.PRESETS): ``full`` is the model's stock causal attention;
any other preset is switched on for evaluation too (``set_attention(..., during="always")``).

``eval_passkey``: LongLoRA's passkey retrieval. A random 5-digit pass key is hidden at a relative
depth inside repeated filler text; the model greedy-decodes the answer.
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli.options import AttentionOptions, KVPolicyOptions, ModelOptions, option
from .usage import UsageError, check_adapter_dir, check_model_dir

__all__ = [
    "eval_ppl",
    "window_nll",
    "eval_passkey",
    "passkey_prompt",
    "EvalPplConfig",
    "EvalKVConfig",
    "PasskeyConfig",
    "run_eval_ppl",
    "run_eval_kv",
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
# Configured runs: `sinklora eval-ppl`, `eval-passkey`, `eval-kv` (their flags are the fields)
# ----------------------------------------------------------------------------------------------


def load_for_eval(model_path=None, adapter=None, *, dtype=None, device=None):
    """The model (adapter merged in, context extension of a `sinklora train` output applied) and
    its tokenizer, in eval mode."""
    from .hf.models import load_model

    meta = check_adapter_eval_inputs(model_path, adapter)
    if model_path is None and meta is not None:
        model_path = meta.base_model
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    if adapter is not None:
        if meta is not None:
            meta.extend_context(model)
        model = load_adapter(model, adapter).merge_and_unload()
        model.eval()
    return model, tokenizer


def check_adapter_eval_inputs(model_path, adapter):
    """``--model`` and ``--adapter`` checked before anything loads; the adapter's `sinklora train`
    metadata (:class:`~sinklora_ext.train.CheckpointMeta`; None without one)."""
    from .train import read_checkpoint_meta

    check_model_dir(model_path)
    if adapter is None:
        return None
    check_adapter_dir(adapter)
    meta = read_checkpoint_meta(adapter)
    if model_path is None and meta is not None and meta.base_model is not None:
        check_model_dir(meta.base_model, f"--adapter {adapter}: its base model (sinklora.json)")
    return meta


def load_adapter(model, adapter):
    """``PeftModel.from_pretrained`` that refuses an adapter of another base model or rank: every
    tensor of the adapter file must be one of the model's adapter tensors, with its shape, and the
    other way round (peft alone would load a partial match with a warning)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from .hf import lora

    try:
        peft_model = lora.load_adapter(model, adapter)
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


@dataclass(kw_only=True)
class EvalPplConfig(AttentionOptions, ModelOptions):
    """`sinklora eval-ppl`: perplexity over windows of ``context`` tokens of ``text``."""

    text: str = option(help="UTF-8 text file, or a Debian corpus name (debian-reference, gnu-standards, "
                            "bash-reference)")
    context: int = option(minimum=2, help="window length N in tokens")
    max_windows: int | None = option(None, minimum=1, help="evaluate only the first K windows")
    batch_size: int = option(1, minimum=1, help="windows per forward pass")


@dataclass(kw_only=True)
class PasskeyConfig(AttentionOptions, ModelOptions):
    """`sinklora eval-passkey`: passkey retrieval at a prompt of at most ``length`` tokens."""

    length: int = option(minimum=1, help="prompt length in tokens (at most)")
    depth: float = option(0.5, help="relative position of the key, 0..1 (default 0.5)")
    trials: int = option(10, minimum=1, help="number of keys tried (default 10)")
    seed: int = option(0)

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.depth <= 1.0:
            raise UsageError(f"--depth must be in [0, 1], got {self.depth}")


@dataclass(kw_only=True)
class EvalKVConfig(KVPolicyOptions, ModelOptions):
    """`sinklora eval-kv`: teacher-forced decoding of the first ``context`` tokens of ``text``
    through the paged cache under a policy (docs/paged_kv.md)."""

    text: str = option(help="UTF-8 text file, or a Debian corpus name")
    context: int = option(minimum=2, help="evaluate the first N tokens")
    prefill: int | None = option(None, minimum=1, help="prompt tokens before decoding (default: budget)")


def _model_fields(model) -> dict:
    return dict(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                device=str(next(model.parameters()).device))


def run_eval_ppl(config: EvalPplConfig) -> dict:
    """Perplexity as `sinklora eval-ppl` reports it: :func:`eval_ppl`'s result plus the settings."""
    from .data import resolve_text_path, tokenize_file

    config.check_model_inputs()
    text = resolve_text_path(config.text)
    started = time.perf_counter()
    model, tokenizer = config.load()
    config.apply_attention(model)
    tokens = tokenize_file(tokenizer, text)
    if tokens.numel() < config.context:
        raise UsageError(f"--text: {text} has {tokens.numel()} tokens, fewer than one window of --context "
                         f"{config.context}")
    result = eval_ppl(model, tokenizer, tokens, config.context, config.max_windows, config.batch_size,
                      progress=not config.no_progress)
    result.update(
        attn=config.attn,
        group_ratio=config.group_ratio if config.attn != "full" else None,
        sinks=None if config.attn == "full" else config.num_sinks,
        text=str(text),
        model=config.model or "default",
        adapter=config.adapter,
        **_model_fields(model),
        seconds=round(time.perf_counter() - started, 2),
    )
    return result


def ppl_summary(result: dict) -> str:
    return (f"ppl {result['ppl']:.4f} over {result['tokens']} predicted tokens "
            f"({result['windows']} windows of {result['context']}, attn {result['attn']})")


def run_eval_kv(config: EvalKVConfig) -> dict:
    """Teacher-forced decoding through the paged cache under a policy, as `sinklora eval-kv`."""
    from .data import resolve_text_path, tokenize_file
    from .engine import teacher_forced_nll

    policy = config.cache_policy()
    config.check_model_inputs()
    text = resolve_text_path(config.text)
    started = time.perf_counter()
    model, tokenizer = config.load()
    ids = tokenize_file(tokenizer, text)[: config.context].to(next(model.parameters()).device)
    if ids.shape[0] < config.context:
        raise UsageError(f"--text: {text} has only {ids.shape[0]} tokens, fewer than --context {config.context}")
    prefill = config.prefill if config.prefill is not None else (config.kv_budget or config.context)
    nll, stats = teacher_forced_nll(model, ids, policy, prefill, config.block_size, progress=not config.no_progress)
    full_blocks = -(-config.context // config.block_size)
    return dict(ppl=math.exp(float(nll.double().mean())), tokens=int(nll.numel()), policy=config.policy,
                kv_budget=config.kv_budget, sinks=config.sinks, recent=policy.recent_tokens if policy.evicts else None,
                prefill=min(prefill, config.context), context=config.context, full_cache_blocks=full_blocks, **stats,
                model=config.model or "default", adapter=config.adapter,
                seconds=round(time.perf_counter() - started, 2))


def kv_summary(result: dict) -> str:
    budget = "" if result["kv_budget"] is None else f" (budget {result['kv_budget']})"
    return (f"ppl {result['ppl']:.4f} over {result['tokens']} tokens, policy {result['policy']}{budget}: "
            f"{result['kv_blocks']} KV blocks per layer vs {result['full_cache_blocks']} for a full cache")


def run_eval_passkey(config: PasskeyConfig) -> dict:
    """Passkey retrieval as `sinklora eval-passkey`: :func:`eval_passkey`'s result plus the settings."""
    config.check_model_inputs()
    started = time.perf_counter()
    model, tokenizer = config.load()
    limit = _max_positions(model)
    if limit is not None and config.length > PASSKEY_MAX_CONTEXTS * limit:
        raise UsageError(f"--length must be <= {PASSKEY_MAX_CONTEXTS} x the model's context ({limit} tokens), "
                         f"got {config.length}")
    config.apply_attention(model)
    result = eval_passkey(model, tokenizer, config.length, config.depth, config.trials, config.seed,
                          progress=not config.no_progress)
    result.update(attn=config.attn, model=config.model or "default", adapter=config.adapter,
                  seconds=round(time.perf_counter() - started, 2))
    return result


def passkey_summary(result: dict) -> str:
    return (f"passkey accuracy {result['accuracy']:.2f} ({result['correct']}/{result['trials']}) "
            f"at {result['tokens']} tokens, depth {result['depth']}")
