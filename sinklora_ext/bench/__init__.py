"""Benchmarks against the peers: ``attention`` (SF-Attn vs SDPA, FlexAttention, LongLoRA),
``decode`` (paged H2O decode vs SDPA, FlashInfer), ``generate`` (model decode latency vs
transformers), ``extension`` (SinkLoRA's context-extension experiment). Run one as
``sinklora bench TARGET`` or ``python -m sinklora_ext.bench.TARGET``; recorded results, plots and
RESULTS.md are in the repository's ``bench/``."""
