"""`sinklora generate`: text generation through the paged cache (full / H2O / StreamingLLM), streamed."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .evaluate import add_kv_policy_arguments, add_model_arguments, check_adapter_eval_inputs, kv_policy, load_for_eval
from .usage import UsageError, at_least, check_device


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text (repeat for a batch of prompts decoded together)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--static", action="store_true",
                        help="fixed-shape decode steps over all batch rows (captured in a CUDA graph on a GPU)")
    add_kv_policy_arguments(parser, policy_default="full")
    add_model_arguments(parser)
    return parser


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """``text`` as a user turn of the tokenizer's chat template, ready for the assistant's answer."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_dict=True)
    ids = enc["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def run(args) -> dict:
    at_least(args, 1, "max_new_tokens")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if any(not text for text in args.prompt):
        raise UsageError("--prompt must not be empty")
    policy = kv_policy(args)
    check_device(args.device)
    check_adapter_eval_inputs(args.model, args.adapter)
    from .engine import DecodeEngine, Request

    model, tokenizer = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
    prompts = []
    for text in args.prompt:
        use_chat = args.chat and getattr(tokenizer, "chat_template", None)
        prompts.append(chat_prompt_ids(tokenizer, text) if use_chat else list(tokenizer(text).input_ids))
    longest_prompt = max(len(p) for p in prompts)
    longest = longest_prompt + args.max_new_tokens
    slots = policy.slots_per_sequence(longest, longest_prompt)
    context = model.config.max_position_embeddings
    if longest_prompt > context:
        raise UsageError(f"--prompt: a prompt has {longest_prompt} tokens, more than the model's context ({context})")
    if slots > context:
        raise UsageError(
            f"--max-new-tokens: the cache would hold {slots} tokens per sequence (prompt {longest_prompt} + "
            f"{args.max_new_tokens} new{'' if not policy.evicts else f', --kv-budget {policy.budget}'}), more than "
            f"the model's context ({context}); generate fewer tokens or evict with a smaller --kv-budget")
    engine = DecodeEngine(model, policy, max_seqs=len(prompts), max_tokens=slots,
                          block_size=args.block_size, seed=args.seed, static=args.static)
    stop = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    requests = [Request(p, args.max_new_tokens, args.temperature, args.top_p, stop) for p in prompts]
    single = len(requests) == 1 and not args.json

    def stream(req, token):
        if single:
            sys.stdout.write(tokenizer.decode([token]))
            sys.stdout.flush()

    started = time.perf_counter()
    done = engine.run(requests, on_token=stream)
    seconds = time.perf_counter() - started
    if single:
        print()
    texts = [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests]
    if not single:
        for prompt, text in zip(args.prompt, texts):
            print(f"{prompt!r} -> {text!r}")
    generated = sum(len(r.output_ids) for r in done)
    result = dict(outputs=texts, tokens=generated, seconds=round(seconds, 3),
                  tokens_per_s=generated / seconds if seconds > 0 else None, policy=args.policy,
                  kv_budget=args.kv_budget, model=args.model or "default")
    print(f"[{generated} tokens in {seconds:.2f} s, {result['tokens_per_s']:.1f} tokens/s, policy {args.policy}]",
          file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return result
