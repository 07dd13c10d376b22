"""The offline demo: a tiny Qwen2 model with the real Qwen2.5 tokenizer."""
