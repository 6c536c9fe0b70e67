"""Heads on cached SSL features: rooms by concern, imports running one way (tests/test_layering.py).

    config.py     every setting of train-head, ablate, finetune and baseline, and the lists of choices (no torch)
    runfolder.py  the run folder: its file names, config.json, fold outputs (as cache/format.py owns the cache)
    model/        the head as torch modules: pooling (GAP, SAP, SR), layer mix, normalizations, the loss
    evaluate/     metrics, reports over folds, baseline comparisons, plots
    train/        folds and batches, what is fitted on a training split, the trainer, ensembles, layer
                  weights, the fold loop, and the classical baseline fitted on the same folds
    finetune/     the same head on a live backbone: backbone, waveform batches, its trainer, DDP, checkpoints
    predict.py    trained folds on new audio;  demo.py  the whole pipeline offline

A room imports only the rooms listed above it (model and evaluate, side by side, not each other).
"""
