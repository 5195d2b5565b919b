"""The model: GPTModel (token ids -> logits), its loss paths, LoRA adapters."""
