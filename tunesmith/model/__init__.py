"""Models: a --model value -> a local folder (aliases, the offline default model, the hub, GGUF files),
loading it with its tokenizer (load), and staging the weights onto the GPU while the rest starts (preload)."""
