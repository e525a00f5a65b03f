"""Training: `tunesmith sft` from arguments to adapter (loop), the memory plan (planner), checkpoints and
resuming (checkpoint, resume), Ctrl-C and the NaN guard (stopping), and several processes (distributed)."""
