"""The head as torch modules: frames (B, T, L, D) + masks -> logits and valence/arousal. Imports no training code."""
