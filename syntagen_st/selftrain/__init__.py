"""Self-training: refine math, held-out predictions, round decisions, selection, the step runner."""
