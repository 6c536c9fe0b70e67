"""What a cache holds, as one JSON-able dict (for `cli info`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from cache.contents import storage
from cache.format import corpora
from cache.reader import FeatureCache


def cache_info(path: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """Counts, sizes and settings of a cache (one file or a shard set)."""
    with FeatureCache(path) as cache:
        fp, meta = cache.fingerprint, cache.meta
        emotions = meta["emotion"]
        return {
            "path": str(cache.path),
            "files": [str(p) for p in cache.paths],
            "utterances": len(meta),
            "frames": int(meta["n_frames"].sum()),
            "hours": float(meta["duration"].sum()) / 3600.0,
            "layers": list(cache.layers),
            "hidden_size": int(cache.hidden_size),
            "dtype": str(cache.dtype),
            "float32_fallback": int(meta["float32_fallback"].sum()),
            "truncated": int(meta["truncated"].sum()),
            "size_bytes": int(cache.size_on_disk()),
            "storage": [storage(p) for p in cache.paths],
            "model": fp.get("model", ""),
            "dataset": fp.get("dataset", fp.get("corpus", "")),
            "corpora": corpora(fp),  # more than one: rows were appended from other corpora (cli extract --append)
            "max_seconds": fp.get("max_seconds"),
            "vad": _vad_settings(fp),
            "classes": {c: int((emotions == c).sum()) for c in cache.classes},
            "no_emotion": int(emotions.isna().sum()),
            "speakers": {str(s): int(n) for s, n in sorted(meta["speaker"].value_counts().items())},
            "skipped": {str(r): int(n) for r, n in sorted(cache.skipped["reason"].value_counts().items())},
            "skipped_items": cache.skipped.to_dict(orient="records"),
            "fingerprint": fp,
        }


def _vad_settings(fp: dict[str, Any]) -> dict[str, Any]:
    """VAD keys of the fingerprint, nested or flat (`vad`, `vad_frame_ms`, ...)."""
    nested = fp.get("vad")
    out = dict(nested) if isinstance(nested, dict) else {}
    out.update({k: v for k, v in fp.items() if k.startswith("vad") and not isinstance(v, dict)})
    return out


def info_table(info: dict[str, Any]) -> Group:
    """The summary as rich tables: settings, then classes, speakers and skips."""
    head = Table(title=f"cache {info['path']}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("utterances", f"{info['utterances']:,}"),
        ("frames", f"{info['frames']:,}"),
        ("hours", f"{info['hours']:.2f}"),
        ("layers", _span(info["layers"])),
        ("hidden size", str(info["hidden_size"])),
        ("dtype", info["dtype"] + (f" ({info['float32_fallback']} in float32: overflow)" if info["float32_fallback"] else "")),
        ("size on disk", _size(info["size_bytes"])),
        ("model", str(info["model"])),
        ("dataset", str(info["dataset"])),
        ("corpus" if len(info["corpora"]) < 2 else "corpora", ", ".join(info["corpora"]) or "(not recorded)"),
        ("max seconds", f"{info['max_seconds']:g} ({info['truncated']} utterances cut)" if info["max_seconds"] else "none"),
        ("VAD", ", ".join(f"{k}={v}" for k, v in info["vad"].items()) or "-"),
        ("files", "\n".join(info["files"])),
        ("stored as", "\n".join(_stored_as(s) for s in info["storage"])),
    ]
    for name, value in rows:
        head.add_row(name, value)
    parts: list[Any] = [head, _counts("class", info["classes"] | ({"(none)": info["no_emotion"]} if info["no_emotion"] else {}))]
    parts.append(_counts("speaker", info["speakers"]))
    parts.append(_skips(info["skipped_items"]) if info["skipped_items"] else "no skipped items")
    return Group(*parts)


def _stored_as(s: dict[str, Any]) -> str:
    """`one self-contained file`, or `index (12 KiB) + F.data/ (3 files, 1.2 GiB): ...`."""
    name = Path(s["file"]).name
    if s["self_contained"]:
        return f"{name}: one self-contained file"
    folders = " + ".join(f"{f}/" for f in s["data_folders"])
    return (f"{name}: an index ({_size(s['file_bytes'])}) + {folders} ({s['data_files']} files, "
            f"{_size(s['data_bytes'])}); copy or move them together, or `cli pack {name}` for one file")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _skips(items: list[dict[str, str]], examples: int = 3) -> Table:
    """Count per reason, with the first few items and details (`--json` lists them all)."""
    table = Table()
    for name in ("skipped (reason)", "items", "e.g."):
        table.add_column(name, justify="right" if name == "items" else "left")
    by_reason: dict[str, list[dict[str, str]]] = {}
    for it in items:
        by_reason.setdefault(it["reason"], []).append(it)
    for reason, rows in sorted(by_reason.items()):
        shown = "; ".join(f"{r['item']}" + (f" ({r['detail']})" if r["detail"] else "") for r in rows[:examples])
        table.add_row(reason, f"{len(rows):,}", shown + (" ..." if len(rows) > examples else ""))
    return table


def _counts(what: str, counts: dict[str, int]) -> Table:
    table = Table()
    table.add_column(what)
    table.add_column("utterances", justify="right")
    for name, n in counts.items():
        table.add_row(str(name), f"{n:,}")
    return table


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]} ({len(layers)})"
    return ", ".join(map(str, layers))
