"""Finetuning: records rendered into examples and batches, their objectives, `gptlab finetune`."""
