"""`cli`: a thin Typer app. Commands parse options and call plain library functions.

Every error a user can cause is a `UserError` and prints as one line on stderr
with exit code 2, and so does every OSError (a read-only, full or missing folder,
a permission): those are about the user's paths. Anything else is a bug and keeps
its traceback. Ctrl-C and SIGTERM stop a command with one line (`interrupted; rerun
the same command to continue` where a rerun continues) and exit code 130 or 143.
"""

from __future__ import annotations

import functools
import json
import pickle
import signal
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console

# The tables below hold every default and list of choices the options show; none imports torch.
from core.choices import spoken
from core.devices import DEVICES
from core.errors import UserError, os_error_message
from core.folds import PROTOCOLS
from core.frames import VAD_MODES
from core.interrupts import signals_interrupt, stopped
from core.records import CLASSES_4
from core.settings import default_of, flag_of, help_of
from extract.config import ExtractConfig
from extract.corpora import DATASETS
from heads.demo import DemoConfig
from heads.config import (FRAMES, LAYER_WEIGHTS, NORMS, POOLED_NORMS, POOLINGS, STATISTICS, BaselineConfig, FinetuneSettings,
                          TrainConfig, finetune_config)
from heads.fold_ensemble import AUTO, AUTO_BELOW, AUTO_HEADS, parse_ensemble

# torch warns about the pickle protocol of a file it then refuses to load anyway (see user_errors):
# noise in front of the one-line refusal.
warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)

app = typer.Typer(
    help="Speech emotion recognition with cached SSL features: extract once, train heads fast "
    "(Segmental Average Pooling, GAP/SAP/SR, leave-one-speaker-out).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# What an interrupted command left, and how to go on: every unit of work is written whole
# (an utterance part, a fold folder, an epoch checkpoint), so a rerun continues from there.
RESUME_HINTS = {
    "extract": "rerun the same command to continue",
    "train_head": "rerun the same command to continue",
    "ablate": "rerun the same command to continue",
    "finetune": "rerun the same command with --resume to continue",
}


def user_errors(fn: Callable) -> Callable:
    """Turn a UserError or an OSError into `error: <message>` on stderr and exit code 2, and Ctrl-C or
    SIGTERM into `interrupted; <how to continue>` with exit code 130 or 143 (128 + the signal)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals_interrupt():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            stopped()
            hint = RESUME_HINTS.get(fn.__name__)
            typer.echo("interrupted" + (f"; {hint}" if hint else ""), err=True)
            raise typer.Exit(code=128 + getattr(err, "signum", signal.SIGINT)) from None
        except UserError as err:
            typer.echo(f"error: {' '.join(str(err).split())}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as err:
            typer.echo(f"error: {os_error_message(err)}", err=True)
            raise typer.Exit(code=2) from None
        except pickle.UnpicklingError:  # torch.load(weights_only=True) refused what it was given
            typer.echo("error: refused to load a pickled model or checkpoint file that is not plain tensors "
                       "(loading it could run code); use weights saved as safetensors", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# --- commands (each one: options, then one call into extract/, cache/ or heads/) ---

# Options that every corpus-reading command (manifest, extract, finetune) takes the same way.
DatasetOpt = Annotated[str, typer.Option("--dataset", help=DATASETS.help())]
RootOpt = Annotated[Path, typer.Option("--root", help="corpus folder (for `manifest`: the CSV file itself)")]
ClassesOpt = Annotated[str, typer.Option("--classes", help="comma-separated class set")]
CLASS_SET = ",".join(CLASSES_4)
MaxSecondsOpt = Annotated[float | None, typer.Option(
    "--max-seconds", help="keep the first S seconds [default: the dataset's, 0 = all]")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help=f"fold plan: {PROTOCOLS.help()}")]


def parse_classes(classes: str) -> tuple[str, ...]:
    """`--classes "Angry, happy"` -> ("angry", "happy"); the readers check the names."""
    return tuple(c.strip().lower() for c in classes.split(",") if c.strip())


@app.command()
@user_errors
def manifest(
    dataset: DatasetOpt,
    root: RootOpt,
    out: Annotated[Path | None, typer.Option("--out", help="write the normalized manifest here, and skipped.csv beside it")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only one JSON object: counts, folds, skips")] = False,
    classes: ClassesOpt = CLASS_SET,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad item instead of skipping it")] = False,
    ties: Annotated[str | None, typer.Option("--ties", help="KEMDy19/20 tied labels: skip (default), first or selected")] = None,
    protocol: ProtocolOpt = "speaker",
) -> None:
    """Read a corpus: counts per class and speaker, the fold plan, every skipped item by reason."""
    from core.folds import PROTOCOLS
    from core.records import write_manifest
    from extract.corpora import read_corpus
    from extract.corpus_summary import summarize, summary_tables

    options = {}
    if ties is not None:
        tied = [name for name, d in DATASETS.items() if d.ties]
        if dataset not in tied:
            raise UserError(f"--ties applies only to {' and '.join(tied)} (the corpora with tied labels)")
        options["ties"] = ties
    class_set = parse_classes(classes)
    corpus = read_corpus(dataset, root, classes=class_set, strict=strict, **options)
    summary = summarize(corpus, PROTOCOLS.check(protocol))
    written = write_manifest(corpus, out) if out is not None else ()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    for table in summary_tables(corpus, summary):
        console.print(table)
    if written:
        console.print(f"wrote {written[0]} and {written[1]}", highlight=False)


@app.command()
@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folder(s) from train-head; several are shown side by side")],
    as_json: Annotated[bool, typer.Option("--json", help="print only JSON: one run's summary, or a list for several")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="do not write RUN/confusion.png and RUN/curves.png")] = False,
) -> None:
    """UA/WA mean and 95% CI over folds (the paper's Table 1), macro-F1, per-class recall,
    valence/arousal MAE and CCC; writes the confusion-matrix and training-curve plots."""
    from heads.metrics import json_safe
    from heads.plots import write_run_plots  # matplotlib only when this command runs
    from heads.report import load_run, pooled_recall_line, render_folds, render_table, render_tables, summarize, table_width

    loaded = [load_run(r) for r in runs]
    summaries = [summarize(r) for r in loaded]
    written = [] if no_plots else [p for r in loaded for p in write_run_plots(r)]
    for r in loaded:
        if r.unfinished:
            typer.echo(f"note: {r.path} has unfinished folds that are not counted: {', '.join(r.unfinished)}", err=True)
    if as_json:
        typer.echo(json.dumps(json_safe(summaries[0] if len(summaries) == 1 else summaries), indent=2, allow_nan=False))
        return
    console = Console()
    if console.is_terminal:
        tables = render_tables(summaries, console.width)
    else:  # a file or a pipe: one table at its full width, nothing wrapped or cut
        tables = [render_table(summaries)]
        console = Console(width=max(table_width(tables[0]), table_width(render_folds(loaded[0]))))
    for table in tables:
        console.print(table)
    if len(loaded) == 1:
        console.print(render_folds(loaded[0]))
    for s in summaries:
        console.print(pooled_recall_line(s), highlight=False)
    for p in written:
        console.print(f"wrote {p}", highlight=False)


@app.command()
@user_errors
def info(
    cache: Annotated[Path, typer.Argument(help="cache file F.h5 (or its base path when only F.shard-i-of-n.h5 files exist)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """What a feature cache holds: utterances, hours, layers, model, VAD, counts, skipped items."""
    from cache.info import cache_info, info_table  # h5py/pandas only when this command runs

    summary = cache_info(cache)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        Console().print(info_table(summary))


@app.command()
@user_errors
def pack(
    cache: Annotated[Path, typer.Argument(help="cache file F.h5 (an index with its F.data/ folder, or the base path of a shard set)")],
    out: Annotated[Path | None, typer.Option("--out", help="write the packed file here and keep the cache as it is (default: replace F.h5 in place and delete the data files it now holds)")] = None,
) -> None:
    """Pack a cache into one self-contained HDF5 file (no F.data/ folder beside it), to copy it to another
    machine or archive it; features and VAD masks are copied bit for bit."""
    from cache.pack import pack_cache  # h5py only when this command runs

    done = pack_cache(cache, out)
    removed = f"; deleted the {len(done['removed'])} data file(s) it absorbed" if done["removed"] else ""
    typer.echo(f"{done['out']}: one self-contained file, {done['utterances']:,} utterances, "
               f"{done['bytes'] / 2**20:.1f} MiB{removed}")


def _x(name: str) -> typer.models.OptionInfo:
    """`cli extract`'s option for ExtractConfig field `name`: its flag and help from the dataclass."""
    return typer.Option(flag_of(ExtractConfig, name), help=help_of(ExtractConfig, name))


X = ExtractConfig  # the defaults below are ExtractConfig's (default_of(X, name) == getattr(X(), name))


@app.command()
@user_errors
def extract(
    dataset: DatasetOpt,
    root: RootOpt,
    out: Annotated[Path | None, typer.Option("--out", help="cache file (default: features/<corpus>-<model>.h5)")] = None,
    model: Annotated[str, _x("model")] = default_of(X, "model"),
    layers: Annotated[str, _x("layers")] = default_of(X, "layers"),
    max_seconds: Annotated[float | None, _x("max_seconds")] = default_of(X, "max_seconds"),
    batch_seconds: Annotated[float | None, _x("batch_seconds")] = default_of(X, "batch_seconds"),
    device: Annotated[str, _x("device")] = default_of(X, "device"),
    dtype: Annotated[str, _x("dtype")] = default_of(X, "dtype"),
    amp: Annotated[str, _x("amp")] = default_of(X, "amp"),
    workers: Annotated[int | None, _x("workers")] = default_of(X, "workers"),
    streams: Annotated[int | None, _x("streams")] = default_of(X, "streams"),
    shard: Annotated[str | None, _x("shard")] = default_of(X, "shard"),
    strict: Annotated[bool, _x("strict")] = default_of(X, "strict"),
    classes: Annotated[str, _x("classes")] = ",".join(default_of(X, "classes")),
    append: Annotated[bool, _x("append")] = default_of(X, "append"),
    buffer_mb: Annotated[int, _x("buffer_mb")] = default_of(X, "buffer_mb"),
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """SSL hidden states (or fbank / eGeMAPS) and VAD masks of every utterance into a resumable HDF5 cache."""
    from extract.pipeline import run_extract, summary_table

    options = {**locals(), "classes": parse_classes(classes)}
    config = ExtractConfig(**{f.name: options[f.name] for f in fields(ExtractConfig)})
    summary = run_extract(dataset, root, config, out=out, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        Console().print(summary_table(summary))


# Options of the training commands: defaults from heads.config (README "Training heads"), help from its tables.
TRAIN = TrainConfig()
DEMO = DemoConfig()  # heads.demo imports nothing heavy at module level
FINETUNE, FT = finetune_config(), FinetuneSettings()
BASELINE = BaselineConfig()
CacheOpt = Annotated[Path, typer.Option("--cache", help="feature cache F.h5 (from `cli extract`)")]
PoolingOpt = Annotated[str, typer.Option("--pooling", help=POOLINGS.help())]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="use this one cached layer (e.g. 24) instead of the learnable mix of all")]
NormOpt = Annotated[str, typer.Option("--norm", help=f"input normalization before the layer mix: {NORMS.help()}")]
SpreadOpt = Annotated[bool, typer.Option("--spread/--no-spread", help="append each dimension's std over the utterance's "
                                                                      "frames to the pooled vector (not in the paper)")]
SpeechStatsOpt = Annotated[bool, typer.Option("--speech-stats/--no-speech-stats", help="append each dimension's mean "
                                               "and std over the utterance's speech (VAD) frames to the pooled vector (not in the paper)")]
PooledNormOpt = Annotated[str, typer.Option("--pooled-norm", help=f"before the projection: {POOLED_NORMS.help()}")]
PooledDropoutOpt = Annotated[float, typer.Option("--pooled-dropout", help="dropout on the pooled vector before the projection "
                                                  "(training only; 0: none, as in the paper)")]
LayerWeightsOpt = Annotated[str, typer.Option("--layer-weights", help=f"how the layer mix is learned: {LAYER_WEIGHTS.help()}")]
VadOpt = Annotated[int, typer.Option("--vad-mode", help=f"WebRTC VAD aggressiveness {min(VAD_MODES)}-{max(VAD_MODES)} "
                                                          "whose mask SAP uses")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="maximum epochs")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="utterances per batch")]
LrOpt = Annotated[float, typer.Option("--lr", help="AdamW peak learning rate (head on frozen features)")]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay")]
PatienceOpt = Annotated[int, typer.Option("--patience", help="early stopping: epochs without a better validation loss")]
EmaOpt = Annotated[float, typer.Option("--ema", help="validate, keep and save a moving average of the head's weights with this "
                                        "decay per optimizer step (0: the weights themselves, as in the paper)")]
MinStepsOpt = Annotated[int, typer.Option("--min-steps", help="optimizer steps every fold gets at least: on a small corpus the batch shrinks "
                                                              "(not below 16), then epochs and patience grow; 0: exactly as given")]
EnsembleOpt = Annotated[str, typer.Option("--ensemble", metavar="N|auto", help=(
    "heads trained per fold, with seeds SEED, SEED+1, ...; their probabilities and valence/arousal are averaged "
    f"(1: one head, as in the paper; {AUTO}: {AUTO_HEADS} on folds with fewer than {AUTO_BELOW} training utterances, else 1)"))]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed (same seed, same machine: same metrics)")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="weight of the weighted cross-entropy")]
BetaOpt = Annotated[float, typer.Option("--beta", help="weight of the valence MAE")]
GammaOpt = Annotated[float, typer.Option("--gamma", help="weight of the arousal MAE")]
ProjOpt = Annotated[int, typer.Option("--proj-dim", help="projection size before the classifier and regressors")]
HeadsOpt = Annotated[int, typer.Option("--heads", help="SAP self-attention heads (a divisor of the feature size is used)")]
MemOpt = Annotated[float, typer.Option("--memory-gb", help="RAM budget for preloading features (split over --jobs)")]
DeviceOpt = Annotated[str, typer.Option("--device", help=spoken(list(DEVICES)))]
JobsOpt = Annotated[int, typer.Option("--jobs", help="folds trained in parallel processes")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def settings_of(cls: type, options: dict[str, Any], make: Callable[..., Any] | None = None) -> Any:
    """`make` (default: the dataclass `cls`) given the command's options named like `cls`'s fields."""
    names = {f.name for f in fields(cls)}
    return (make or cls)(**{k: v for k, v in options.items() if k in names})


@app.command("train-head")
@user_errors
def train_head(
    cache: CacheOpt,
    fold: Annotated[int | None, typer.Option("--fold", help="train and test fold K (tests speaker K, sorted order)")] = None,
    all_folds: Annotated[bool, typer.Option("--all-folds", help="train every fold")] = False,
    pooling: PoolingOpt = TRAIN.pooling,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<cache stem>-<pooling>]")] = None,
    layer: LayerOpt = TRAIN.layer, norm: NormOpt = TRAIN.norm, layer_weights: LayerWeightsOpt = TRAIN.layer_weights,
    spread: SpreadOpt = TRAIN.spread, speech_stats: SpeechStatsOpt = TRAIN.speech_stats,
    pooled_norm: PooledNormOpt = TRAIN.pooled_norm, pooled_dropout: PooledDropoutOpt = TRAIN.pooled_dropout,
    vad_mode: VadOpt = TRAIN.vad_mode, epochs: EpochsOpt = TRAIN.epochs, batch_size: BatchOpt = TRAIN.batch_size,
    lr: LrOpt = TRAIN.lr, weight_decay: WdOpt = TRAIN.weight_decay, patience: PatienceOpt = TRAIN.patience,
    ema: EmaOpt = TRAIN.ema, min_steps: MinStepsOpt = TRAIN.min_steps, seed: SeedOpt = TRAIN.seed,
    ensemble: EnsembleOpt = TRAIN.ensemble, alpha: AlphaOpt = TRAIN.alpha, beta: BetaOpt = TRAIN.beta, gamma: GammaOpt = TRAIN.gamma,
    proj_dim: ProjOpt = TRAIN.proj_dim, heads: HeadsOpt = TRAIN.heads, memory_gb: MemOpt = TRAIN.memory_gb,
    device: DeviceOpt = TRAIN.device, jobs: JobsOpt = 1, protocol: ProtocolOpt = TRAIN.protocol,
    quiet: QuietOpt = False,
) -> None:
    """Train and test the SR/GAP/SAP head on cached features, one fold or all (leave-one-speaker-out by default)."""
    from heads.run import train_folds

    if (fold is None) == (not all_folds):
        raise UserError("give exactly one of --fold K or --all-folds")
    ensemble = parse_ensemble(ensemble)  # noqa: F841 (read by settings_of through locals())
    config = settings_of(TrainConfig, locals())
    run, _ = train_folds(cache, config, folds=None if all_folds else [fold], out=out, jobs=jobs, progress=not quiet)
    if all_folds:
        from heads.compare import end_of_run_lines

        for line in end_of_run_lines(run):  # and a baseline's on the same folds, when one is beside it
            typer.echo(line)
    typer.echo(f"run folder: {run} (summarize with `cli report {run}`)")


@app.command()
@user_errors
def ablate(
    cache: CacheOpt,
    out: Annotated[Path | None, typer.Option("--out", help="folder for gap/, sap/, sr/ [default: runs/<cache stem>-ablation]")] = None,
    layer: LayerOpt = TRAIN.layer, norm: NormOpt = TRAIN.norm, layer_weights: LayerWeightsOpt = TRAIN.layer_weights,
    spread: SpreadOpt = TRAIN.spread, speech_stats: SpeechStatsOpt = TRAIN.speech_stats,
    pooled_norm: PooledNormOpt = TRAIN.pooled_norm, pooled_dropout: PooledDropoutOpt = TRAIN.pooled_dropout,
    vad_mode: VadOpt = TRAIN.vad_mode, epochs: EpochsOpt = TRAIN.epochs, batch_size: BatchOpt = TRAIN.batch_size,
    lr: LrOpt = TRAIN.lr, weight_decay: WdOpt = TRAIN.weight_decay, patience: PatienceOpt = TRAIN.patience,
    ema: EmaOpt = TRAIN.ema, min_steps: MinStepsOpt = TRAIN.min_steps, seed: SeedOpt = TRAIN.seed,
    ensemble: EnsembleOpt = TRAIN.ensemble, alpha: AlphaOpt = TRAIN.alpha, beta: BetaOpt = TRAIN.beta, gamma: GammaOpt = TRAIN.gamma,
    proj_dim: ProjOpt = TRAIN.proj_dim, heads: HeadsOpt = TRAIN.heads, memory_gb: MemOpt = TRAIN.memory_gb,
    device: DeviceOpt = TRAIN.device, jobs: JobsOpt = 1,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="also run `cli baseline` (same --layer and --vad-mode) into OUT/baseline and show it as a row")] = True,
    protocol: ProtocolOpt = TRAIN.protocol, quiet: QuietOpt = False,
) -> None:
    """GAP, SAP and SR over all folds of one cache, plus the classical baseline, then side by side
    (the paper's Tables 1 and 3)."""
    from heads.report import render_runs, table_width
    from heads.run import ablate as run_ablation

    ensemble = parse_ensemble(ensemble)  # noqa: F841 (read by settings_of through locals())
    config = settings_of(TrainConfig, locals())
    runs = run_ablation(cache, config, out=out, jobs=jobs, progress=not quiet, baseline=baseline)
    table = render_runs(runs, title=f"Pooling ablation on {cache.name}")
    Console(width=max(80, table_width(table))).print(table)  # full width, never wrapped, even in a pipe
    if baseline:
        from heads.compare import baseline_comparisons

        for run in runs[1:]:  # does each head beat the baseline on the same folds?
            for _, paired in baseline_comparisons(run):
                typer.echo(paired)


@app.command()
@user_errors
def baseline(
    cache: CacheOpt,
    fold: Annotated[int | None, typer.Option("--fold", help="only fold K [default: every fold]")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<cache stem>-baseline]")] = None,
    layer: Annotated[int | None, typer.Option("--layer", help="statistics of this one cached layer [default: every cached layer, concatenated]")] = BASELINE.layer,
    frames: Annotated[str, typer.Option("--frames", help=FRAMES.help())] = BASELINE.frames,
    statistics: Annotated[str, typer.Option("--stats", help=f"per-dimension statistics: {STATISTICS.help()}")] = BASELINE.statistics,
    vad_mode: VadOpt = BASELINE.vad_mode,
    protocol: ProtocolOpt = BASELINE.protocol,
    quiet: QuietOpt = False,
) -> None:
    """A classical baseline on the same folds: mean and std of each utterance's frames + StandardScaler +
    LogisticRegression (class-balanced; C chosen on the validation speaker) and Ridge for valence/arousal."""
    from heads.baseline import run_baseline
    from heads.compare import end_of_run_lines

    config = settings_of(BaselineConfig, locals())
    run, _ = run_baseline(cache, config, folds=None if fold is None else [fold], out=out, progress=not quiet)
    for line in end_of_run_lines(run, baselines=False):
        typer.echo(line)
    typer.echo(f"run folder: {run} (summarize with `cli report {run}`)")


@app.command()
@user_errors
def finetune(
    dataset: DatasetOpt,
    root: RootOpt,
    fold: Annotated[int | None, typer.Option("--fold", help="train and test fold K (tests speaker K, sorted order)")] = None,
    all_folds: Annotated[bool, typer.Option("--all-folds", help="train every fold")] = False,
    full: Annotated[bool, typer.Option("--full", help="train the whole backbone end to end (the paper); default: only the top layers")] = FT.full,
    top_layers: Annotated[int, typer.Option("--top-layers", help="without --full: transformer layers trained (from the top)")] = FT.top_layers,
    model: Annotated[str, typer.Option("--model", help="Hugging Face hub id or local folder: a wav2vec2-family model or Whisper")] = FT.model,
    cache: Annotated[Path | None, typer.Option("--cache", help="reuse this feature cache's VAD masks (same model grid and truncation)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<corpus>-<model>-<mode>]")] = None,
    pooling: PoolingOpt = FINETUNE.pooling,
    vad_mode: VadOpt = FINETUNE.vad_mode, epochs: EpochsOpt = FINETUNE.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", help="utterances per optimizer step (gradient accumulation keeps it)")] = FINETUNE.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate of the backbone (the paper: 3e-5)")] = FINETUNE.lr,
    head_lr: Annotated[float | None, typer.Option("--head-lr", help="learning rate of the head [default: --lr]")] = FT.head_lr,
    weight_decay: WdOpt = FINETUNE.weight_decay, patience: PatienceOpt = FINETUNE.patience, seed: SeedOpt = FINETUNE.seed,
    alpha: AlphaOpt = FINETUNE.alpha, beta: BetaOpt = FINETUNE.beta, gamma: GammaOpt = FINETUNE.gamma,
    proj_dim: ProjOpt = FINETUNE.proj_dim, heads: HeadsOpt = FINETUNE.heads,
    step_seconds: Annotated[float, typer.Option("--step-seconds", help="padded audio seconds per micro-batch (the memory bound)")] = FT.step_seconds,
    max_seconds: MaxSecondsOpt = FT.max_seconds,
    freeze_feature_encoder: Annotated[bool, typer.Option("--freeze-feature-encoder/--no-freeze-feature-encoder", help="keep the convolutional front end frozen")] = FT.freeze_feature_encoder,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="recompute transformer layers in the backward pass to save memory")] = FT.grad_checkpointing,
    amp: Annotated[str, typer.Option("--amp", help="autocast: auto (bf16 on GPUs that have it), bf16, fp16 or none")] = FT.amp,
    device: DeviceOpt = FINETUNE.device,
    workers: Annotated[int, typer.Option("--workers", help="audio decoding processes per rank")] = FT.workers,
    resume: Annotated[bool, typer.Option("--resume", help="continue interrupted folds from their checkpoints, skip finished ones")] = False,
    max_epochs_this_run: Annotated[int | None, typer.Option("--max-epochs-this-run", help="stop after N epochs (checkpointed) and exit; continue with --resume")] = None,
    classes: ClassesOpt = CLASS_SET,
    protocol: ProtocolOpt = FINETUNE.protocol,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune an SSL model with the SR head end to end (--full) or its top layers; torchrun runs it on N GPUs."""
    from heads.finetune import run_finetune

    if (fold is None) == (not all_folds):
        raise UserError("give exactly one of --fold K or --all-folds")
    options = locals()
    config = settings_of(TrainConfig, options, make=finetune_config)
    settings = settings_of(FinetuneSettings, options)
    class_set = parse_classes(classes)
    result = run_finetune(dataset, root, config, settings, folds=None if all_folds else [fold], out=out,
                          cache_path=str(cache) if cache else None, resume=resume,
                          max_epochs_this_run=max_epochs_this_run, classes=class_set, progress=not quiet,
                          log=lambda line: typer.echo(line, err=True))
    if result.is_main:
        if result.unfinished:
            typer.echo(f"run folder: {result.out} (folds {', '.join(map(str, result.unfinished))} unfinished: rerun with --resume)")
        else:
            typer.echo(f"run folder: {result.out} (summarize with `cli report {result.out}`)")


@app.command()
@user_errors
def predict(
    audio: Annotated[list[Path], typer.Argument(help="audio files (any format soundfile reads)")],
    run: Annotated[Path, typer.Option("--run", help="a trained fold folder RUN/fold-KK, or a run folder RUN (all its folds averaged)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list instead of a line per file")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "cpu",
) -> None:
    """Emotion probabilities (and valence/arousal, when the head learned them) and the VAD speech ratio of each
    file; bad files are reported, not fatal; files a fold trained on are flagged."""
    from heads.metrics import json_safe
    from heads.predict import format_line, load_predictor, seen_warning

    predictor = load_predictor(run, device=device)
    results = []
    for path in audio:
        p = predictor.predict_one(path)
        results.append(p)
        if not as_json:
            typer.echo(format_line(p), err=not p.ok)
        warning = seen_warning(p)
        if warning:
            typer.echo(warning, err=True)
    if as_json:
        typer.echo(json.dumps(json_safe([p.as_dict() for p in results]), indent=2, allow_nan=False))
    failed = sum(not p.ok for p in results)
    if failed:
        typer.echo(f"error: {failed} of {len(results)} files could not be read", err=True)
        raise typer.Exit(code=1)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="output folder (refused if non-empty and not a previous demo)")] = Path(
        "demo-out"),
    seed: Annotated[int, typer.Option(help="seed of the synthetic corpus, the tiny WavLM and training")] = 0,
    sessions: Annotated[int, typer.Option(help="synthetic sessions (2 speakers each, one fold per speaker)")] = 3,
    utts_per_speaker: Annotated[int, typer.Option(help="synthetic utterances per speaker")] = 24,
    epochs: Annotated[int, typer.Option(help="training epochs per fold before the step plan (heads/steps.py) "
                                             "triples them on this tiny corpus")] = DEMO.epochs,
    batch_size: Annotated[int, typer.Option(help="head batch size (16: the demo corpus is tiny)")] = DEMO.batch_size,
    ensemble: Annotated[str, typer.Option(metavar="N|auto", help=f"heads per fold, averaged: a count or {AUTO} "
                                               f"(train-head's default; {AUTO_HEADS} here, ~2.4x the demo's time)")] = str(DEMO.ensemble),
    backends: Annotated[str, typer.Option(help="comma-separated: fbank, tiny-wavlm")] = "fbank,tiny-wavlm",
    jobs: Annotated[int, typer.Option(help="folds trained in parallel processes (1 torch thread each on 2 cores)")] = 2,
) -> None:
    """The whole pipeline offline on CPU: synthetic corpus -> features + VAD -> GAP/SAP/SR heads over all
    folds -> the paper-style table and plots. The numbers check the pipeline, not real SER accuracy."""
    from heads.demo import run_demo

    config = DemoConfig(seed=seed, n_sessions=sessions, utts_per_speaker=utts_per_speaker, epochs=epochs,
                        batch_size=batch_size, ensemble=parse_ensemble(ensemble), jobs=jobs,
                        backends=tuple(b.strip() for b in backends.split(",") if b.strip()))
    run_demo(out, config)


if __name__ == "__main__":
    app()
