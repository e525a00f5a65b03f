"""The fast path. Each switch has a safe fallback and a CPU-runnable test against the plain path.

- attention: padding-free packing. The samples of one accumulation window are concatenated into one row;
  attention runs per sample ("document attention") on each slice, so no sample sees another.
- patches: fused kernels from Liger (RMSNorm, SwiGLU, RoPE) where installed and on CUDA; mixed precision for
  the adapter (half-precision matmuls on the activations, float32 master weights).
- loss: only at answer positions, in recomputed chunks: the [tokens, vocab] logits never exist.
- layers, memory: activation checkpointing on a chosen share of the layers, only where memory requires it.
- decoder_layer, lora_linear, kernels, triton_lora: whole decoder layers as a few autograd functions, LoRA
  linears with in-kernel dropout, and their Triton kernels.
- cuda_graphs: a packed row's forward+backward captured per row shape and replayed.
"""
