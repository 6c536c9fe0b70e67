"""Which corpora exist, their defaults, and one entry point to read any of them.

Each corpus module exposes `read(root, classes, strict, **options) -> Corpus`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from core.records import CLASSES_4, Corpus, CorpusError, Skip, unstorable

# dataset name -> (module, default --max-seconds). 19 s / 16 s are the paper's truncation.
DATASETS: dict[str, tuple[str, float]] = {
    "iemocap": ("extract.iemocap", 19.0),
    "kemdy19": ("extract.kemdy19", 16.0),
    "kemdy20": ("extract.kemdy20", 16.0),
    "manifest": ("extract.manifest", 0.0),
    "synthetic": ("extract.synthetic", 0.0),
}


# Corpora whose dataset name is their identity: there is one IEMOCAP, wherever a copy lives.
NAMED: frozenset[str] = frozenset({"iemocap", "kemdy19", "kemdy20"})


def corpus_identity(corpus: Corpus) -> str:
    """What the cache fingerprint records as `corpus`: the dataset name for a named corpus,
    else the CSV's folder and file name (`ravdess/manifest.csv`).

    Not the full path: a corpus moved to another disk, or mounted elsewhere on the
    machines that extract shards of it, is still the same corpus. Two manifests named
    alike in folders named alike are the one case it cannot tell apart.
    """
    if corpus.name in NAMED:
        return corpus.name
    csv_path = Path(corpus.root)
    return f"{csv_path.parent.name}/{csv_path.name}"


def corpus_slug(corpus: Corpus) -> str:
    """A file-name part that says which corpus: `iemocap`; `ravdess` for ravdess/manifest.csv,
    `ravdess-train` for ravdess/train.csv; `synthetic-<folder>` for a synthetic corpus."""
    if corpus.name in NAMED:
        return corpus.name
    csv_path = Path(corpus.root)
    folder, stem = csv_path.parent.name, csv_path.stem
    parts = [folder or "corpus"] if stem == "manifest" else [folder, stem]
    if corpus.name == "synthetic":
        parts = ["synthetic", folder]
    text = "-".join(p for p in parts if p) or corpus.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def default_max_seconds(dataset: str) -> float:
    """The truncation a dataset gets unless the user says otherwise (0 = none)."""
    return DATASETS[check_dataset(dataset)][1]


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise CorpusError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return dataset


def read_corpus(
    dataset: str,
    root: str | Path,
    classes: tuple[str, ...] = CLASSES_4,
    strict: bool = False,
    **options,
) -> Corpus:
    """Read a corpus by name; `options` are the reader's own (e.g. ties='skip')."""
    module = importlib.import_module(DATASETS[check_dataset(dataset)][0])
    # The synthetic corpus is generated into its root, so only it may name a new folder.
    if dataset != "synthetic" and not Path(root).exists():
        raise CorpusError(f"{dataset} root {str(root)!r} does not exist")
    corpus = module.read(Path(root), classes=tuple(classes), strict=strict, **options)
    return screen_text(corpus, strict)


def screen_text(corpus: Corpus, strict: bool) -> Corpus:
    """Skip utterances with a NUL in an id, name or path (whatever reader let it through):
    the cache cannot store such a string, and one of them would stop every rerun."""
    kept = []
    for utt in corpus.utterances:
        field = unstorable(utt)
        if field is None:
            kept.append(utt)
            continue
        skip = Skip(utt.utt_id, "malformed_line", f"a NUL byte in its {field}")
        if strict:
            raise CorpusError(f"{skip.item}: {skip.detail} (strict mode)")
        corpus.skipped.append(skip)
    corpus.utterances = kept
    return corpus
