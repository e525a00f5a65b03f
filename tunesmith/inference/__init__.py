"""Inference: the chat engine and `tunesmith infer` (infer), the OpenAI-compatible server `tunesmith deploy`
(deploy), and base-versus-tuned answers `tunesmith eval` (evaluate)."""
