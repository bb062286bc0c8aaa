"""Distillation: teacher responses with compact top-k token logprobs for KD training."""
