"""Scores of a fold (metrics), of a run over its folds (report, with 95% CIs), against a baseline (compare), as figures (plots)."""
