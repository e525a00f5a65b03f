"""Training: `tunesmith sft` from arguments to adapter (loop), the memory plan (planner), checkpoints and
resuming (checkpoint, resume), --keep_kl's hold on the base model (keep), Ctrl-C and the NaN guard (stopping), and several processes (distributed)."""
