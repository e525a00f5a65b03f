"""Export: an adapter merged into a standalone model (merge), GGUF files for llama.cpp / Ollama (gguf)."""
