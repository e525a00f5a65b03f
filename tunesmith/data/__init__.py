"""Data: dataset files and hub ids -> chat messages (sources), the chat template and its answer-only loss
mask (template), tokenization cached on disk (cache), and `tunesmith data inspect` (inspect)."""
