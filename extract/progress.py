"""The extraction progress bar: over audio seconds, so the ETA weighs long utterances right."""

from __future__ import annotations

import time


class NoBar:
    """No bar (--quiet, or nothing left to do): the same calls, nothing drawn."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n_utts: int, seconds: float) -> None:
        return None


class Bar(NoBar):
    """rich progress over audio seconds (so the ETA weighs long utterances right) with rates."""

    def __init__(self, n_utts: int, total_seconds: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("extract"), BarColumn(),
            TextColumn("{task.fields[utts]}/{task.fields[n_utts]} utt"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), refresh_per_second=4,
        )
        self.task = self.progress.add_task("extract", total=max(total_seconds, 1e-9), utts=0,
                                           n_utts=n_utts, rate="")
        self.utts = 0
        self.seconds = 0.0
        self.start = time.perf_counter()

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, n_utts: int, seconds: float) -> None:
        self.utts += n_utts
        self.seconds += seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.utts / elapsed:.1f} utt/s, {self.seconds / elapsed:.1f}x real time"
        self.progress.update(self.task, advance=seconds, utts=self.utts, rate=rate)


def progress_bar(show: bool, n_utts: int, total_seconds: float) -> NoBar:
    return Bar(n_utts, total_seconds) if show and n_utts else NoBar()
