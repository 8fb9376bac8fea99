"""`sinklora generate`: text generation through the paged cache (full / H2O / StreamingLLM, see
docs/paged_kv.md), streamed. ``generate(GenerateConfig(prompt=[...], policy="h2o", kv_budget=64))``
is the library call; the command builds the same config from its flags."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .cli.options import KVPolicyOptions, ModelOptions, option
from .kv_cache import POLICIES, RECOMMENDED_POLICY
from .usage import UsageError


@dataclass(kw_only=True)
class GenerateConfig(KVPolicyOptions, ModelOptions):
    """What `sinklora generate` takes; each field is the flag of its name."""

    prompt: list[str] = option(action="append",
                               help="prompt text (repeat for a batch of prompts decoded together)")
    max_new_tokens: int = option(64, minimum=1)
    temperature: float = option(0.0, help="0 = greedy (default)")
    top_p: float = option(1.0)
    seed: int = option(0)
    chat: bool = option(False, help="wrap the prompt in the tokenizer's chat template")
    static: bool = option(False, help="fixed-shape decode steps over all batch rows (captured in a CUDA graph on "
                                      "a GPU)")
    policy: str | None = option(None, choices=POLICIES, help=f"KV cache policy (default: {RECOMMENDED_POLICY} "
                                                             "with --kv-budget, else full)")

    def fill_defaults(self) -> None:
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if self.policy is None:
            self.policy = RECOMMENDED_POLICY if self.kv_budget is not None else "full"
        super().fill_defaults()

    def check(self) -> None:
        super().check()
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.prompt or any(not text for text in self.prompt):
            raise UsageError("--prompt must not be empty")


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """``text`` as a user turn of the tokenizer's chat template, ready for the assistant's answer."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_dict=True)
    ids = enc["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def generate(config: GenerateConfig, stream: bool = False) -> dict:
    """Decode every prompt of ``config`` together; returns ``{"outputs", "tokens", "seconds",
    "tokens_per_s", "policy", "kv_budget", "model"}``. ``stream``: a single prompt's tokens are
    written to stdout as they come; otherwise each ``prompt -> text`` pair is printed at the end."""
    from .engine import DecodeEngine, Request

    policy = config.cache_policy()
    config.check_model_inputs()
    model, tokenizer = config.load()
    prompts = []
    for text in config.prompt:
        use_chat = config.chat and getattr(tokenizer, "chat_template", None)
        prompts.append(chat_prompt_ids(tokenizer, text) if use_chat else list(tokenizer(text).input_ids))
    longest_prompt = max(len(p) for p in prompts)
    longest = longest_prompt + config.max_new_tokens
    slots = policy.slots_per_sequence(longest, longest_prompt)
    context = model.config.max_position_embeddings
    if longest_prompt > context:
        raise UsageError(f"--prompt: a prompt has {longest_prompt} tokens, more than the model's context ({context})")
    if slots > context:
        raise UsageError(
            f"--max-new-tokens: the cache would hold {slots} tokens per sequence (prompt {longest_prompt} + "
            f"{config.max_new_tokens} new{'' if not policy.evicts else f', --kv-budget {policy.budget}'}), more than "
            f"the model's context ({context}); generate fewer tokens or evict with a smaller --kv-budget")
    engine = DecodeEngine(model, policy, max_seqs=len(prompts), max_tokens=slots,
                          block_size=config.block_size, seed=config.seed, static=config.static)
    stop = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    requests = [Request(p, config.max_new_tokens, config.temperature, config.top_p, stop) for p in prompts]
    single = stream and len(requests) == 1

    def write_token(req, token):
        if single:
            sys.stdout.write(tokenizer.decode([token]))
            sys.stdout.flush()

    started = time.perf_counter()
    done = engine.run(requests, on_token=write_token)
    seconds = time.perf_counter() - started
    if single:
        print()
    texts = [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests]
    if not single:
        for prompt, text in zip(config.prompt, texts):
            print(f"{prompt!r} -> {text!r}")
    generated = sum(len(r.output_ids) for r in done)
    result = dict(outputs=texts, tokens=generated, seconds=round(seconds, 3),
                  tokens_per_s=generated / seconds if seconds > 0 else None, policy=config.policy,
                  kv_budget=config.kv_budget, model=config.model or "default")
    print(f"[{generated} tokens in {seconds:.2f} s, {result['tokens_per_s']:.1f} tokens/s, policy {config.policy}]",
          file=sys.stderr)
    return result
