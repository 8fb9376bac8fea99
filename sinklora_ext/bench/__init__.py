"""Benchmarks against the peers: ``attention`` (SF-Attn vs SDPA, FlexAttention, LongLoRA),
``decode`` (paged H2O decode vs SDPA, FlashInfer), ``generate`` (model decode latency vs
transformers), ``extension`` (SinkLoRA's context-extension experiment), ``msa-conv``, ``tic``, ``vllm`` (vLLM's own
CPU backend against the SINKLORA backend in the same KV memory; needs ``make vllm``). Run one as
``sinklora bench TARGET`` or ``python -m sinklora_ext.bench.TARGET``; recorded results, plots and
RESULTS.md are in the repository's ``bench/``."""
