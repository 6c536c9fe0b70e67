"""Pooling, the multi-task head, folds, training, metrics, reports and end-to-end fine-tuning."""
