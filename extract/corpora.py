"""Which corpora exist, their defaults, and one entry point to read any of them.

Each corpus module exposes `read(root, classes, strict, **options) -> Corpus`; a new
corpus is that module plus its entry in DATASETS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from core.choices import Choice, Choices
from core.records import CLASSES_4, Corpus, CorpusError, Skip, unstorable


@dataclass(frozen=True)
class Dataset(Choice):
    """A corpus reader (`module`) and what the rest of the pipeline needs to know about the corpus."""

    module: str = ""
    max_seconds: float = 0.0  # default --max-seconds (0 = no truncation); 19 s / 16 s: the paper's
    named: bool = False  # its name is its identity: there is one IEMOCAP, wherever a copy lives
    ties: bool = False  # raters tie between emotions, which --ties resolves


DATASETS: Choices[Dataset] = Choices("--dataset", {
    "iemocap": Dataset(module="extract.iemocap", max_seconds=19.0, named=True),
    "kemdy19": Dataset(module="extract.kemdy19", max_seconds=16.0, named=True, ties=True),
    "kemdy20": Dataset(module="extract.kemdy20", max_seconds=16.0, named=True, ties=True),
    "manifest": Dataset(module="extract.csv_manifest"),
    "synthetic": Dataset(module="extract.synthetic"),
}, error=CorpusError)


def corpus_identity(corpus: Corpus) -> str:
    """What the cache fingerprint records as `corpus`: the dataset name for a named corpus,
    else the CSV's folder and file name (`ravdess/manifest.csv`).

    Not the full path: a corpus moved to another disk, or mounted elsewhere on the
    machines that extract shards of it, is still the same corpus. Two manifests named
    alike in folders named alike are the one case it cannot tell apart.
    """
    if _named(corpus):
        return corpus.name
    csv_path = Path(corpus.root)
    return f"{csv_path.parent.name}/{csv_path.name}"


def corpus_slug(corpus: Corpus) -> str:
    """A file-name part that says which corpus: `iemocap`; `ravdess` for ravdess/manifest.csv,
    `ravdess-train` for ravdess/train.csv; `synthetic-<folder>` for a synthetic corpus."""
    if _named(corpus):
        return corpus.name
    csv_path = Path(corpus.root)
    folder, stem = csv_path.parent.name, csv_path.stem
    parts = [folder or "corpus"] if stem == "manifest" else [folder, stem]
    if corpus.name == "synthetic":
        parts = ["synthetic", folder]
    text = "-".join(p for p in parts if p) or corpus.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _named(corpus: Corpus) -> bool:
    return corpus.name in DATASETS and DATASETS[corpus.name].named


def default_max_seconds(dataset: str) -> float:
    """The truncation a dataset gets unless the user says otherwise (0 = none)."""
    return DATASETS[check_dataset(dataset)].max_seconds


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
    module = importlib.import_module(DATASETS[check_dataset(dataset)].module)
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
