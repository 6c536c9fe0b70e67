"""Training heads on a cache: folds, batches, fitted statistics, the trainer, ensembles, layer weights, the fold loop, the baseline."""
