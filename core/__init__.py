"""What every stage shares, below extract/, cache/ and heads/: the utterance record and its skip
reasons, the frame grid, fold plans, errors, devices and the tables of named choices.

Imports run one way only (tests/test_layering.py): core <- cache <- extract <- heads <- sapser, cli.
"""
