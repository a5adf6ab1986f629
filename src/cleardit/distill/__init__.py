"""Distillation: teacher data from the original model, then attention-only CLEAR fine-tuning."""
