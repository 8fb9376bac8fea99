"""Paged decoding of a transformers LLaMA-architecture model with H2O / StreamingLLM eviction.

The engine runs the model's own modules (embeddings, norms, projections, rotary embedding, MLP,
head) layer by layer, with attention on the paged cache: prefill through the flash forward plus the
column-sum score kernel, decode steps through ``paged_decode`` with fused scores and one eviction
launch per layer. Positions keep counting tokens seen, not cache length. Sequences of different
lengths join and leave a running batch.

Every step is all or nothing: a prefill or decode step that raises (in a layer, a kernel, the
eviction, or because the block pool is full) leaves the cache as it was before the step
(:meth:`~sinklora_ext.kv_cache.PagedKVCache.rollback`) and emits no token, so the same step can run
again and every sequence decodes exactly as if it had never failed.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .kv_cache import CachePolicy, PagedKVCache, prompt_attention
from .hf.models import base_model


def _rotary(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


class PagedLlama:
    """A LLaMA-architecture ``*ForCausalLM`` (peft adapters merged or not) over a :class:`PagedKVCache`."""

    def __init__(self, model, cache: PagedKVCache):
        base = base_model(model)
        self.model, self.lm_head, self.cache = base.model, base.lm_head, cache
        cfg = base.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.model.layers[0].self_attn.scaling
        if cache.num_layers != len(self.model.layers) or cache.num_kv_heads != self.num_kv_heads:
            raise ValueError("the cache's layers / kv heads do not match the model")

    @staticmethod
    def make_cache(model, policy: CachePolicy, max_tokens: int, max_seqs: int = 1, block_size: int = 16,
                   num_blocks: int | None = None) -> PagedKVCache:
        """A cache sized for ``max_seqs`` sequences of up to ``max_tokens`` slots each."""
        base = base_model(model)
        cfg = base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_seq = math.ceil(max_tokens / block_size)
        param = next(base.parameters())
        return PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                            num_blocks or per_seq * max_seqs, block_size, max_seqs, per_seq, param.dtype,
                            param.device, policy)

    def _layer_qkv(self, layer, hidden, cos, sin):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, D]
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = _rotary(q, k, cos, sin)
        return attn, q, k, v

    def _finish_layer(self, layer, attn, hidden, attn_out):
        hidden = hidden + attn.o_proj(attn_out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.no_grad()
    def prefill(self, seq: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt ``input_ids [P]`` of a new sequence → logits ``[P, vocab]``; the cache then holds
        the prompt, evicted down to the budget."""
        return self.prefill_batch([seq], [input_ids])[0]

    @torch.no_grad()
    def prefill_batch(self, seqs: list[int], prompts: list[torch.Tensor], last_only: bool = False) -> list[torch.Tensor]:
        """The prompts of new sequences in one pass (packed, varlen attention) → each prompt's logits
        ``[P_i, vocab]`` (``[1, vocab]`` with ``last_only``). All or nothing: when the pool cannot
        hold every prompt, or anything in the pass raises, the sequences stay empty and hold no blocks."""
        for seq in seqs:
            if self.cache.lengths[seq] != 0:
                raise ValueError(f"sequence {seq} already holds tokens; prefill starts a sequence")
        lengths = [int(p.shape[0]) for p in prompts]
        if len(seqs) != len(prompts) or min(lengths, default=0) < 1:
            raise ValueError("prefill_batch takes one non-empty prompt per sequence")
        try:
            self.cache.begin_prefills(dict(zip(seqs, lengths)))
            logits = self._prefill_layers(prompts, lengths, last_only)
            self.cache.finish_prefill()  # evicts, so last: nothing after it can fail
        except BaseException:
            self.cache.rollback()
            raise
        return logits

    def _prefill_layers(self, prompts: list[torch.Tensor], lengths: list[int], last_only: bool) -> list[torch.Tensor]:
        device = self.lm_head.weight.device
        hidden = self.model.embed_tokens(torch.cat(prompts).to(device)[None])
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        cos, sin = self.model.rotary_emb(hidden, positions)
        packed = len(prompts) > 1
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device) if packed else None
        total = sum(lengths)
        policy = self.cache.policy
        for i, layer in enumerate(self.model.layers):
            attn, q, k, v = self._layer_qkv(layer, hidden, cos, sin)
            q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [total, H, D]
            if packed:
                out, scores, selection = prompt_attention(q, k, v, self.scale, policy, cu, max(lengths))
            else:
                out, scores, selection = (None if t is None else t[0] for t in
                                          prompt_attention(q[None], k[None], v[None], self.scale, policy))
            self.cache.write_prefill(i, k, v, scores, selection)
            hidden = self._finish_layer(layer, attn, hidden, out.reshape(1, total, -1))
        hidden = self.model.norm(hidden)[0]
        if last_only:
            ends = torch.tensor(list(itertools.accumulate(lengths)), device=device) - 1
            return list(self.lm_head(hidden[ends]).split(1))
        return list(self.lm_head(hidden).split(lengths))

    @torch.no_grad()
    def decode(self, seqs: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (``tokens [B]``) → next-token logits ``[B, vocab]``."""
        return self.decode_rows(tokens, self.cache.begin_decode_step(seqs))

    @torch.no_grad()
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The layers of a decode step the cache has begun (``begin_decode_step``); if they raise,
        the step is rolled back."""
        try:
            return self._decode_layers(tokens, positions)
        except BaseException:
            self.cache.rollback()
            raise

    def _decode_layers(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(tokens[:, None])  # [B, 1, H]
        cos, sin = self.model.rotary_emb(hidden, positions.long()[:, None])
        for i, layer in enumerate(self.model.layers):
            attn, q, k, v = self._layer_qkv(layer, hidden, cos, sin)
            out = self.cache.decode_layer(i, q[:, :, 0], k[:, :, 0], v[:, :, 0], self.scale)
            hidden = self._finish_layer(layer, attn, hidden, out.reshape(out.shape[0], 1, -1))
        return self.lm_head(self.model.norm(hidden))[:, 0]


class StaticDecoder:
    """Decode steps over every cache row at once, with the same tensors each step (rows not decoding
    attend nothing and write nothing). On CUDA the step is captured into a CUDA graph after one eager
    step and replayed from then on, so a step costs one graph launch instead of a few hundred."""

    def __init__(self, runner: PagedLlama, cuda_graph: bool | None = None):
        cache = runner.cache
        self.runner = runner
        self.tokens = torch.zeros(cache.max_seqs, dtype=torch.long, device=cache.device)
        rope = str(getattr(runner.model.rotary_emb, "rope_type", "default"))
        # dynamic and longrope RoPE pick their frequencies from the positions on the host, each step
        capturable = "dynamic" not in rope and "longrope" not in rope
        if cuda_graph and not capturable:
            raise ValueError(f"cuda_graph: rope_type {rope!r} chooses frequencies on the host each step, "
                             "which a CUDA graph cannot capture")
        self.cuda_graph = cache.device.type == "cuda" and capturable if cuda_graph is None else cuda_graph
        self.graph, self.logits, self.steps, self.split = None, None, 0, None

    @torch.no_grad()
    def __call__(self, seqs: list[int], tokens: torch.Tensor) -> torch.Tensor:
        positions = self.runner.cache.begin_decode_step(seqs, static=True)
        try:
            rows = torch.tensor(seqs, device=self.tokens.device)
            self.tokens.zero_().index_copy_(0, rows, tokens.to(self.tokens.device, torch.long))
            if self.cuda_graph:
                with torch.cuda.device(self.tokens.device):  # streams and capture on the cache's GPU
                    logits = self._graph_step(positions)
            else:
                logits = self.runner.decode_rows(self.tokens, positions)
        except BaseException:
            self.runner.cache.rollback()
            raise
        self.steps += 1
        return logits.index_select(0, rows)

    def _graph_step(self, positions: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        if self.steps == 0:  # eager warm-up on a side stream, so lazy initialisation stays out of the capture
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                logits = self.runner.decode_rows(self.tokens, positions)
            stream.wait_stream(side)
            logits.record_stream(stream)
            return logits
        # Each step's plan (begin_decode_step) validated this step's tables, lengths and write slots;
        # the graph's kernels were captured with the split sizes of the capture step's plan.
        split = self.runner.cache.step_plan.decode_split
        if self.graph is not None and split != self.split:
            raise RuntimeError(f"decode step plan splits {split} differ from the captured graph's {self.split}")
        if self.graph is None:  # capture records without running; the replay below runs it
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    logits = self.runner.decode_rows(self.tokens, positions)
            except Exception as e:  # this step's inputs are staged: run it eagerly, and every later one
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly")
                self.cuda_graph = False
                return self.runner.decode_rows(self.tokens, positions)
            self.graph, self.logits, self.split = graph, logits, split
        self.graph.replay()
        return self.logits


@dataclass(eq=False)  # a request is itself, not its fields: two alike may run at once
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    seq: int | None = None
    done: bool = False


class DecodeEngine:
    """Batched generation over a paged cache: requests of different lengths join as they arrive
    (prefill) and leave when they stop, the rest keep decoding together.

    :meth:`run` takes a list of requests to completion; :meth:`admit`, :meth:`step` and
    :meth:`cancel` drive the same loop one event at a time. Each of them is all or nothing: when it
    raises, no token was emitted and the cache is as it was before the call."""

    def __init__(self, model, policy: CachePolicy, max_seqs: int = 4, max_tokens: int = 4096,
                 block_size: int = 16, num_blocks: int | None = None, seed: int = 0, static: bool = False):
        self.cache = PagedLlama.make_cache(model, policy, max_tokens, max_seqs, block_size, num_blocks)
        self.runner = PagedLlama(model, self.cache)
        # static=True: fixed-shape steps over all rows (a CUDA graph on GPU); else only the active rows
        self.decode = StaticDecoder(self.runner) if static else self.runner.decode
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.active: list[Request] = []  # admitted and still decoding, in order of admission
        self.tokens_generated = 0
        self.seconds = 0.0

    def _sample(self, logits: torch.Tensor, req: Request) -> int:
        if req.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < req.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _sample_all(self, requests: list[Request], logits) -> list[int]:
        state = self.generator.get_state()
        try:
            return [self._sample(row, req) for req, row in zip(requests, logits)]
        except BaseException:  # e.g. NaN logits: as if nothing was sampled
            self.generator.set_state(state)
            raise

    def _record(self, requests: list[Request], tokens: list[int], on_token) -> list[Request]:
        """Append every request's token (finished requests leave the cache), then stream them: a
        raising ``on_token`` finds the step complete."""
        finished = []
        for req, token in zip(requests, tokens):
            req.output_ids.append(token)
            if token in req.stop_ids or len(req.output_ids) >= req.max_new_tokens:
                req.done = True
                self.cache.release(req.seq)
                finished.append(req)
        self.active = [r for r in self.active if not r.done]
        if on_token is not None:
            for req, token in zip(requests, tokens):
                on_token(req, token)
        return finished

    def admit(self, requests: list[Request], on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """Prefill new requests in one packed pass and sample their first tokens; they then decode
        in :meth:`step`. Returns those already finished. Raises :class:`BlockPoolExhausted` when the
        free rows or blocks cannot hold every prompt, and then, as on any error, admits none."""
        requests, seqs = list(requests), []
        if len(set(requests)) != len(requests) or any(r.output_ids or r.done for r in requests):
            raise ValueError("admit takes new requests, each once (no output yet, not done)")
        try:
            for _ in requests:
                seqs.append(self.cache.add_sequence())
            ids = [torch.tensor(r.prompt_ids, dtype=torch.long, device=self.device) for r in requests]
            logits = self.runner.prefill_batch(seqs, ids, last_only=True)
            tokens = self._sample_all(requests, [last[-1] for last in logits])
        except BaseException:
            for seq in seqs:
                self.cache.release(seq)
            raise
        for req, seq in zip(requests, seqs):
            req.seq = seq
        self.active += requests
        return self._record(requests, tokens, on_token)

    def step(self, on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """One decode step of every active request; returns those that finished. Raises
        :class:`BlockPoolExhausted` when a growing sequence finds no free block; after that or any
        other error nothing has changed, and the step can be run again."""
        if not self.active:
            return []
        requests = list(self.active)
        tokens = torch.tensor([r.output_ids[-1] for r in requests], device=self.device)
        logits = self.decode([r.seq for r in requests], tokens)
        try:
            sampled = self._sample_all(requests, logits)
        except BaseException:
            self.cache.rollback()  # the decode step is still open in the cache
            raise
        return self._record(requests, sampled, on_token)

    def cancel(self, req: Request) -> None:
        """Stop an active request now; its blocks return to the pool."""
        if req not in self.active:
            raise ValueError("cancel takes an active request of this engine")
        self.active.remove(req)
        req.done = True
        self.cache.release(req.seq)

    def _most_blocks(self, req: Request) -> int:
        """The most blocks a request holds at once: its prompt, then up to its budget (and the token
        being attended) or, never evicting, all it will have seen when its last token is sampled."""
        most_tokens = len(req.prompt_ids) + req.max_new_tokens - 1
        slots = self.cache.policy.slots_per_sequence(most_tokens, len(req.prompt_ids))
        return -(-slots // self.cache.block_size)

    def _admissible(self, pending: list[Request]) -> int:
        """How many of the first pending requests fit now beside the running ones, counting the most
        blocks each can come to hold (a request too large for the pool counts, so that admitting it
        says why)."""
        blocks = self.cache.num_blocks - sum(self._most_blocks(r) for r in self.active)
        ceiling, count = min(self.cache.max_blocks_per_seq, self.cache.num_blocks), 0
        for req in pending[: self.cache.free_rows]:
            need = self._most_blocks(req)
            if blocks < need <= ceiling:
                break
            blocks, count = blocks - need, count + 1
        return count

    def run(self, requests: Iterable[Request], on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """Run every request to completion; ``on_token`` streams tokens as they come. A request waits
        until a row and the most blocks it can come to hold are free beside the running requests', so
        no step runs out of blocks; one that the whole pool cannot hold raises why. If ``run`` raises,
        the requests it admitted are cancelled."""
        pending, finished, admitted = list(requests), [], []
        start = time.perf_counter()
        try:
            while pending or self.active:
                count = self._admissible(pending)
                if count or (pending and not self.active):
                    batch, pending = pending[: max(count, 1)], pending[max(count, 1):]
                    admitted += batch
                    finished += self.admit(batch, on_token)
                finished += self.step(on_token)
        except BaseException:
            for req in admitted:
                if req in self.active:
                    self.cancel(req)
            raise
        self.seconds += time.perf_counter() - start
        self.tokens_generated += sum(len(r.output_ids) for r in finished)
        return finished


@torch.no_grad()
def teacher_forced_nll(model, input_ids: torch.Tensor, policy: CachePolicy, prefill: int, block_size: int = 16,
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """NLL of tokens 1..N-1 of ``input_ids [N]`` (or of every row of ``[B, N]``, decoded as one
    batch): prefill ``prefill`` tokens, then one token at a time through the paged cache under
    ``policy`` (docs/cli.md, eval-kv). Returns (nll [N-1] or [B, N-1], stats of the first row)."""
    from tqdm.auto import tqdm

    rows = input_ids[None] if input_ids.dim() == 1 else input_ids
    batch, n = rows.shape
    prefill = max(1, min(prefill, n))
    cache = PagedLlama.make_cache(model, policy, policy.slots_per_sequence(n, prefill), batch, block_size)
    runner = PagedLlama(model, cache)
    seqs = [cache.add_sequence() for _ in range(batch)]
    first = runner.prefill_batch(seqs, list(rows[:, :prefill]))
    logits = [torch.stack(first).float()]  # [B, prefill, vocab]
    peak_blocks = len(cache.blocks_of(seqs[0]))
    start = time.perf_counter()
    for t in tqdm(range(prefill, n - 1), desc=f"eval-kv {policy.name}", disable=not progress, leave=False):
        logits.append(runner.decode(seqs, rows[:, t]).float()[:, None])
        peak_blocks = max(peak_blocks, len(cache.blocks_of(seqs[0])))
    seconds = time.perf_counter() - start
    logits = torch.cat(logits, dim=1)[:, : n - 1]
    nll = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:n].flatten(), reduction="none").view(batch, n - 1)
    steps = max(n - 1 - prefill, 0)
    stats = dict(kv_blocks=len(cache.blocks_of(seqs[0])), peak_kv_blocks=peak_blocks, block_size=block_size,
                 kv_slots=cache.lengths[seqs[0]], decode_steps=steps,
                 tokens_per_s=steps * batch / seconds if seconds > 0 else None)
    return (nll[0] if input_ids.dim() == 1 else nll), stats
