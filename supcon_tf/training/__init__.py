"""Training: the trainer (host loop, restore, save, preemption), the step, extensions, checkpoints."""
