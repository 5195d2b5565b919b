"""Training: the loop, its objective and components, optimizers, schedule and budget, resume."""
