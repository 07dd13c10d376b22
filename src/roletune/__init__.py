"""roletune: turn a chat LLM into a character (or any specialist) with LoRA."""

__version__ = "0.1.0"
