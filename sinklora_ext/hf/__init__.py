"""Hugging Face glue: the SF-Attn attention backend, the paged H2O cache, LoRA+ and model loading."""
