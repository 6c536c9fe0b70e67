"""End-to-end fine-tuning: the train-head trainer with its hooks overridden for a live backbone (torchrun-aware)."""
