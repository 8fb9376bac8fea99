"""The KV-cache spec of SINKLORA layers and its block manager (vLLM's engine core side).

A request's blocks, per layer group: all of its prompt while the prompt is processed (chunked
prefill attends over the whole prompt and scores it), then, once the backend has compacted the
prompt to the budget (its first decode step), only the first ``ceil((kv_budget + 1) / block_size)``:
the rest go back to vLLM's pool. Decode steps never grow a request past those blocks; the backend
writes each new token into the slot its eviction freed. Which keys a block holds is per (layer, kv
head) and lives in the pages; the manager only decides how many blocks a request holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .config import SinkLoRAConfig


@dataclass(frozen=True, kw_only=True)
class SinkLoRASpec(FullAttentionSpec):
    policy: str = "full"
    kv_budget: int | None = None
    num_sinks: int = 4
    recent: int | None = None

    @property
    def config(self) -> SinkLoRAConfig:
        return SinkLoRAConfig(self.policy, self.kv_budget, self.num_sinks, self.recent)

    @property
    def resident_blocks(self) -> int | None:
        """Blocks a request keeps after its prompt (None: every block, policy ``full``)."""
        return self.config.resident_blocks(self.block_size)

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, config: SinkLoRAConfig) -> "SinkLoRASpec":
        kwargs = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**kwargs, policy=config.policy, kv_budget=config.kv_budget, num_sinks=config.num_sinks,
                   recent=config.recent)

    @classmethod
    def merge(cls, specs: list["SinkLoRASpec"]) -> "SinkLoRASpec":
        merged = super().merge(specs)  # FullAttentionSpec's checks; it drops our fields
        first = specs[0]
        ours = ("policy", "kv_budget", "num_sinks", "recent")
        for spec in specs:
            assert all(getattr(spec, name) == getattr(first, name) for name in ours), (
                "all SINKLORA layers of a KV cache group must share one policy")
        return cls.from_spec(merged, first.config)


class SinkLoRAManager(FullAttentionManager):
    """:class:`FullAttentionManager` whose requests shrink to the budget after their prompt."""

    def __init__(self, kv_cache_spec: SinkLoRASpec, *args, **kwargs):
        super().__init__(kv_cache_spec, *args, **kwargs)
        self.resident_blocks = kv_cache_spec.resident_blocks
        # per running request: the token its prefill (a prompt, or a resumed request's replay) ends at,
        # as the scheduler last said; and whether its last allocation was a decode step
        self._prefill_end: dict[str, int] = {}
        self._decoding: dict[str, bool] = {}

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        if self.resident_blocks is not None:
            held = len(self.req_to_blocks.get(request_id, ()))
            if apply_admission_cap:  # the whole request: its prompt, then the budget
                budget_tokens = self.kv_cache_spec.kv_budget + 1
                num_tokens = min(num_tokens, max(prefill_end, budget_tokens))
            elif total_computed_tokens >= prefill_end > 0:  # a decode step: never past the resident blocks
                self._decoding[request_id] = True
                num_tokens = min(num_tokens, max(held, self.resident_blocks) * self.block_size)
            else:
                self._decoding[request_id] = False
                self._prefill_end[request_id] = prefill_end
        return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                                  total_computed_tokens, num_local_computed_tokens,
                                                  num_tokens_main_model, apply_admission_cap, prefill_end)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        if self.resident_blocks is not None and self._decoding.get(request_id, False):
            held = len(self.req_to_blocks.get(request_id, ()))
            num_tokens = min(num_tokens, max(held, self.resident_blocks) * self.block_size)
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Once the request's prefill is processed (this step decodes, and the backend compacts it
        first), give back every block past the resident ones."""
        if self.resident_blocks is None or request_id not in self.req_to_blocks:
            return
        end = self._prefill_end.get(request_id)
        if end is None or processed_computed_tokens < end or processed_computed_tokens <= self.kv_cache_spec.kv_budget:
            return
        self._remove_blocks_in_range(request_id, self.resident_blocks, len(self.req_to_blocks[request_id]))

    def free(self, request_id: str) -> None:
        self._prefill_end.pop(request_id, None)
        self._decoding.pop(request_id, None)
        super().free(request_id)
