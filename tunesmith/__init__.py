"""tunesmith: LoRA fine-tuning of chat LLMs in one command."""

__version__ = "0.1.0"
