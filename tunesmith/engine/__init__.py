"""The fast path: per-sample attention over packed rows, the fused loss, Liger and precision patches and
checkpointing (fast), whole decoder layers as a few autograd functions (decoder_layer), LoRA linears with
in-kernel dropout (lora_linear), their Triton kernels (kernels, triton_lora), and CUDA graphs (cuda_graphs)."""
