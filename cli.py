"""`cli`: a thin Typer app. Commands parse options and call plain library functions.

Every error a user can cause is a `UserError` and prints as one line on stderr
with exit code 2, and so does every OSError (a read-only, full or missing folder,
a permission): those are about the user's paths. Anything else is a bug and keeps
its traceback. Ctrl-C and SIGTERM stop a command with one line (`interrupted; rerun
the same command to continue` where a rerun continues) and exit code 130 or 143.
"""

from __future__ import annotations

import functools
import inspect
import json
import pickle
import signal
import sys
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Callable, get_type_hints

if "--multiprocessing-fork" in getattr(sys, "orig_argv", ()):
    # A worker started by multiprocessing's spawn re-imports this module before any of our code runs in it;
    # Ctrl-C reaches the whole process group and is the parent's to handle (core/processes.py quiet_child),
    # so a worker interrupted while still importing must not print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

# The tables below hold every default and list of choices the options show; none imports torch.
from core.errors import UserError, os_error_message  # noqa: E402
from core.folds import PROTOCOLS  # noqa: E402
from core.interrupts import signals_interrupt, stopped  # noqa: E402
from core.records import CLASSES_4, parse_classes  # noqa: E402
from extract.config import ExtractConfig  # noqa: E402
from extract.corpora import DATASETS  # noqa: E402
from heads.config import (AUTO, AUTO_HEADS, BaselineConfig, FinetuneSettings, TrainConfig, finetune_config,  # noqa: E402
                          parse_ensemble, recipe_of)
from heads.demo import DemoConfig  # noqa: E402
from extract.segments import SegmentRule  # noqa: E402
from heads.runfolder import CONFUSION_PLOT, CURVES_PLOT, LAYERS_JSON, LAYERS_PLOT, SEGMENTS_FILE, TIMELINE_PLOT  # noqa: E402

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


# --- options from settings dataclasses (extract/config.py, heads/config.py): one home for each default and its help ---


@dataclass(frozen=True)
class Settings:
    """A settings dataclass a command takes as options: each field with `cli=True` (or those in `only`)
    becomes `--field-name` with the field's default and help; the command receives the built object
    as its parameter `param`."""

    cls: type
    param: str
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()  # fields this command does not take (they keep their defaults)
    make: Callable[..., Any] | None = None  # how the object is built from the options (default: cls)
    helps: dict[str, str] = field(default_factory=dict)  # help worded for this command

    def fields(self) -> list[Any]:
        return [f for f in fields(self.cls) if f.name not in self.skip
                and (f.name in self.only if self.only else f.metadata.get("cli", True))]

    def defaults(self) -> Any:
        return (self.make or self.cls)()

    def option(self, f: Any, hint: Any, default: Any) -> inspect.Parameter:
        meta = f.metadata
        kind = str if meta.get("parse") else hint
        # a switch that is on by default can be turned off; one that is off is just named
        flag = meta.get("flag") or ("--{0}/--no-{0}" if hint is bool and default else "--{0}").format(f.name.replace("_", "-"))
        option = typer.Option(flag, help=self.helps.get(f.name) or meta.get("help", ""), metavar=meta.get("metavar"))
        shown = (",".join(default) if isinstance(default, tuple) else str(default)) if meta.get("parse") else default
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=shown, annotation=Annotated[kind, option])

    def build(self, options: dict[str, Any], given: set[str]) -> Any:
        """The settings object from the options. With a recipe other than "default" (`--recipe`), the
        recipe's values replace the command's defaults and only the options given on the command line
        (`given`) override them."""
        parsed = {f.name: f.metadata["parse"](options[f.name]) if f.metadata.get("parse") else options[f.name]
                  for f in self.fields()}
        make = self.make or self.cls
        recipe = parsed.get("recipe", "default")
        if recipe == "default":
            return make(**parsed)
        explicit = {k: v for k, v in parsed.items() if k in given and k != "recipe"}
        return make(**{**recipe_of(recipe), **explicit, "recipe": recipe})


def takes(*groups: Settings) -> Callable[[Callable], Callable]:
    """Give a command the options of settings dataclasses: train-head, ablate and finetune share TrainConfig's
    declarations instead of repeating them; the command gets the built objects."""

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True)
        taken = {g.param for g in groups}
        params = [p for p in own.parameters.values() if p.name not in taken]
        names: dict[str, list[str]] = {}
        for g in groups:
            hints, defaults = get_type_hints(g.cls), g.defaults()
            chosen = g.fields()
            names[g.param] = [f.name for f in chosen]
            params += [g.option(f, hints[f.name], getattr(defaults, f.name)) for f in chosen]

        # typer hands the command its context, which knows the options given on the command line
        params.append(inspect.Parameter("cli_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(fn)
        def command(**options: Any) -> Any:
            ctx = options.pop("cli_context")
            given = {n for n in options if ctx.get_parameter_source(n) is not None
                     and ctx.get_parameter_source(n).name not in ("DEFAULT", "DEFAULT_MAP")}
            for g in groups:
                options[g.param] = g.build({n: options.pop(n) for n in names[g.param]}, given)
            return fn(**options)

        command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# --- commands (each one: options, then one call into extract/, cache/ or heads/) ---

# Options that every corpus-reading command (manifest, extract, finetune) takes the same way.
DatasetOpt = Annotated[str, typer.Option("--dataset", help=DATASETS.help())]
RootOpt = Annotated[Path, typer.Option("--root", help="corpus folder (for `manifest`: the CSV file itself)")]
ClassesOpt = Annotated[str, typer.Option("--classes", help="comma-separated class set")]
CLASS_SET = ",".join(CLASSES_4)
MaxSecondsOpt = Annotated[float | None, typer.Option(
    "--max-seconds", help="keep the first S seconds [default: the dataset's, 0 = all]")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help=f"fold plan: {PROTOCOLS.help()}")]


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
    no_plots: Annotated[bool, typer.Option("--no-plots", help=f"do not write RUN/{CONFUSION_PLOT} and RUN/{CURVES_PLOT}")] = False,
) -> None:
    """UA/WA mean and 95% CI over folds (the paper's Table 1), macro-F1, per-class recall,
    valence/arousal MAE and CCC; writes the confusion-matrix and training-curve plots."""
    from heads.evaluate.plots import write_run_plots  # matplotlib only when this command runs
    from heads.evaluate.report import (
        load_run,
        pooled_recall_line,
        render_folds,
        render_table,
        render_tables,
        summarize,
        table_width,
    )
    from heads.runfolder import json_safe

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
        if s.get("cross_corpus"):
            console.print(f"{s['run']}: cross-corpus, {s['cross_corpus']}", highlight=False)
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


@app.command()
@user_errors
@takes(Settings(ExtractConfig, "config"))
def extract(
    config: ExtractConfig,
    dataset: DatasetOpt,
    root: RootOpt,
    out: Annotated[Path | None, typer.Option("--out", help="cache file (default: features/<corpus>-<model>.h5)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """SSL hidden states (or fbank / eGeMAPS) and VAD masks of every utterance into a resumable HDF5 cache."""
    from extract.pipeline import run_extract, summary_table

    summary = run_extract(dataset, root, config, out=out, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        Console().print(summary_table(summary))


TRAIN = Settings(TrainConfig, "config")
DEMO = DemoConfig()  # heads.demo imports nothing heavy at module level
CacheOpt = Annotated[list[Path], typer.Option("--cache", metavar="F.h5", help="feature cache F.h5 (from `cli extract`); several: "
                                               "a cross-corpus run over them (leave one corpus out, or train on "
                                               "them all with --test-cache)")]
TestCacheOpt = Annotated[list[Path] | None, typer.Option("--test-cache", metavar="F.h5", help="cross-corpus: test on this cache (one "
                                                         "fold each; repeatable), train on the --cache ones")]


def caches(cache: list[Path]) -> Path | list[Path]:
    """One --cache as itself, several as the list a cross-corpus run reads."""
    return cache[0] if len(cache) == 1 else cache
JobsOpt = Annotated[int, typer.Option("--jobs", help="folds trained in parallel processes")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
FoldOpt = Annotated[int | None, typer.Option("--fold", help="train and test fold K (tests speaker K, sorted order)")]
AllFoldsOpt = Annotated[bool, typer.Option("--all-folds", help="train every fold")]


@app.command("train-head")
@user_errors
@takes(TRAIN)
def train_head(
    config: TrainConfig,
    cache: CacheOpt,
    test_cache: TestCacheOpt = None,
    fold: FoldOpt = None,
    all_folds: AllFoldsOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<cache stem>-<pooling>]")] = None,
    jobs: JobsOpt = 1,
    quiet: QuietOpt = False,
) -> None:
    """Train and test the SR/GAP/SAP head on cached features, one fold or all (leave-one-speaker-out by default)."""
    from heads.train.fold_loop import train_folds

    if (fold is None) == (not all_folds):
        raise UserError("give exactly one of --fold K or --all-folds")
    run, _ = train_folds(caches(cache), config, folds=None if all_folds else [fold], out=out, jobs=jobs,
                         progress=not quiet, test_caches=test_cache or ())
    if all_folds:
        from heads.evaluate.compare import end_of_run_lines

        for line in end_of_run_lines(run):  # and a baseline's on the same folds, when one is beside it
            typer.echo(line)
    typer.echo(f"run folder: {run} (summarize with `cli report {run}`)")


@app.command()
@user_errors
@takes(Settings(TrainConfig, "config", skip=("pooling",)))  # it trains GAP, SAP and SR
def ablate(
    config: TrainConfig,
    cache: CacheOpt,
    test_cache: TestCacheOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder for gap/, sap/, sr/ [default: runs/<cache stem>-ablation]")] = None,
    jobs: JobsOpt = 1,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="also run `cli baseline` (same --layer and --vad-mode) into OUT/baseline and show it as a row")] = True,
    quiet: QuietOpt = False,
) -> None:
    """GAP, SAP and SR over all folds of one cache, plus the classical baseline, then side by side
    (the paper's Tables 1 and 3)."""
    from heads.evaluate.report import render_runs, table_width
    from heads.train.fold_loop import ablate as run_ablation

    runs = run_ablation(caches(cache), config, out=out, jobs=jobs, progress=not quiet, baseline=baseline,
                        test_caches=test_cache or ())
    table = render_runs(runs, title=f"Pooling ablation on {', '.join(c.name for c in cache)}"
                                    + (f" -> {', '.join(c.name for c in test_cache)}" if test_cache else ""))
    Console(width=max(80, table_width(table))).print(table)  # full width, never wrapped, even in a pipe
    if baseline:
        from heads.evaluate.compare import baseline_comparisons

        for run in runs[1:]:  # does each head beat the baseline on the same folds?
            for _, paired in baseline_comparisons(run):
                typer.echo(paired)


@app.command()
@user_errors
@takes(Settings(BaselineConfig, "config"))
def baseline(
    config: BaselineConfig,
    cache: CacheOpt,
    test_cache: TestCacheOpt = None,
    fold: Annotated[int | None, typer.Option("--fold", help="only fold K [default: every fold]")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<cache stem>-baseline]")] = None,
    quiet: QuietOpt = False,
) -> None:
    """A classical baseline on the same folds: mean and std of each utterance's frames + StandardScaler +
    LogisticRegression (class-balanced; C chosen on the validation speaker) and Ridge for valence/arousal."""
    from heads.evaluate.compare import end_of_run_lines
    from heads.train.baseline import run_baseline

    run, _ = run_baseline(caches(cache), config, folds=None if fold is None else [fold], out=out,
                          progress=not quiet, test_caches=test_cache or ())
    for line in end_of_run_lines(run, baselines=False):
        typer.echo(line)
    typer.echo(f"run folder: {run} (summarize with `cli report {run}`)")


# `cli layers` reads the fold plan and VAD mode from TrainConfig, and with --heads the head's main settings.
LAYERS_TRAIN = ("vad_mode", "protocol", "pooling", "ensemble", "epochs", "seed", "memory_gb", "device")


@app.command()
@user_errors
@takes(Settings(TrainConfig, "config", only=LAYERS_TRAIN, helps={
    "pooling": "with --heads: the pooling of each layer's head",
    "ensemble": "with --heads: heads per fold, averaged (N or auto)",
    "epochs": "with --heads: maximum epochs", "seed": "with --heads: random seed",
    "memory_gb": "with --heads: RAM budget for preloading features", "device": "with --heads: auto, cpu or cuda"}))
def layers(
    config: TrainConfig,
    cache: Annotated[Path, typer.Option("--cache", metavar="F.h5", help="feature cache F.h5 (from `cli extract`)")],
    out: Annotated[Path | None, typer.Option("--out", help=f"folder for {LAYERS_JSON}, {LAYERS_PLOT} (and layer-KK/ run folders) [default: runs/<cache stem>-layers]")] = None,
    heads: Annotated[bool, typer.Option("--heads", help="also train the head on each layer alone (train-head --layer K --all-folds) and show its UA beside the probe's")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=f"print only the JSON summary (what {LAYERS_JSON} holds)")] = False,
    quiet: QuietOpt = False,
) -> None:
    """UA per cached layer: a linear probe on each layer's utterance means, fitted on every fold's training
    speakers and scored on its test speaker (and, with --heads, the head on that layer alone); mean and
    95% CI over folds as a table, layers.json and layers.png."""
    from heads.evaluate.layers import render_layers
    from heads.evaluate.report import table_width
    from heads.runfolder import json_safe
    from heads.train.layer_scan import scan_layers

    summary = scan_layers(cache, config, heads=heads, out=out, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        return
    table = render_layers(summary, title=f"{cache.name}: UA per layer, mean over {summary['folds']} folds (95% CI)")
    Console(width=max(80, table_width(table))).print(table)  # full width, never wrapped, even in a pipe
    for p in summary["files"]:
        typer.echo(f"wrote {p}")


# Fine-tuning takes the head's settings at the paper's fine-tuning values (heads.config.finetune_config);
# the input statistics, layer mix, ensembles and step minimum are for heads on a cache.
FINETUNE_TRAIN = ("recipe", "pooling", "vad_mode", "epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "alpha",
                  "beta", "gamma", "proj_dim", "heads", "device", "protocol")


@app.command()
@user_errors
@takes(Settings(TrainConfig, "config", only=FINETUNE_TRAIN, make=finetune_config, helps={
           "batch_size": "utterances per optimizer step (gradient accumulation keeps it)",
           "lr": "AdamW peak learning rate of the backbone (the paper: 3e-5)"}),
       Settings(FinetuneSettings, "settings"))
def finetune(
    config: TrainConfig,
    settings: FinetuneSettings,
    dataset: DatasetOpt,
    root: RootOpt,
    fold: FoldOpt = None,
    all_folds: AllFoldsOpt = False,
    cache: Annotated[Path | None, typer.Option("--cache", help="reuse this feature cache's VAD masks (same model grid and truncation)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder [default: runs/<corpus>-<model>-<mode>]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue interrupted folds from their checkpoints, skip finished ones")] = False,
    max_epochs_this_run: Annotated[int | None, typer.Option("--max-epochs-this-run", help="stop after N epochs (checkpointed) and exit; continue with --resume")] = None,
    classes: ClassesOpt = CLASS_SET,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune an SSL model with the SR head end to end (--full) or its top layers; torchrun runs it on N GPUs."""
    from heads.finetune.run import run_finetune

    if (fold is None) == (not all_folds):
        raise UserError("give exactly one of --fold K or --all-folds")
    if config.recipe == "paper":  # the paper fine-tunes all of WavLM Large
        settings = replace(settings, full=True)
    result = run_finetune(dataset, root, config, settings, folds=None if all_folds else [fold], out=out,
                          cache_path=str(cache) if cache else None, resume=resume,
                          max_epochs_this_run=max_epochs_this_run, classes=parse_classes(classes), progress=not quiet,
                          log=lambda line: typer.echo(line, err=True))
    if result.is_main:
        if result.unfinished:
            typer.echo(f"run folder: {result.out} (folds {', '.join(map(str, result.unfinished))} unfinished: rerun with --resume)")
        else:
            typer.echo(f"run folder: {result.out} (summarize with `cli report {result.out}`)")


@app.command()
@user_errors
@takes(Settings(SegmentRule, "rule"))
def predict(
    rule: SegmentRule,
    audio: Annotated[list[Path], typer.Argument(help="audio files (any format soundfile reads)")],
    run: Annotated[Path, typer.Option("--run", help="a trained fold folder RUN/fold-KK, or a run folder RUN (all its folds averaged)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list instead of a line per file (with --segments: one JSON object, the summary)")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "cpu",
    segments: Annotated[bool, typer.Option("--segments", help=f"one long recording: stream it, cut it into speech segments with the run's VAD and predict each into OUT/{SEGMENTS_FILE} and OUT/{TIMELINE_PLOT}")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="with --segments: the output folder [default: <audio stem>-segments]")] = None,
) -> None:
    """Emotion probabilities (and valence/arousal, when the head learned them) and the VAD speech ratio of each
    file; bad files are reported, not fatal; files a fold trained on are flagged. With --segments, the same
    for every speech segment of one long recording, in memory that does not grow with its length."""
    from heads.predict import format_line, load_predictor, seen_warning
    from heads.runfolder import json_safe

    if segments:
        if len(audio) != 1:
            raise UserError(f"--segments takes one recording at a time, got {len(audio)} files")
        rule.validate()
    predictor = load_predictor(run, device=device)
    if segments:
        return _predict_segments(predictor, audio[0], rule, out, as_json)
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


def _predict_segments(predictor: Any, recording: Path, rule: SegmentRule, out: Path | None, as_json: bool) -> None:
    from heads.predict import format_line, write_segments
    from heads.runfolder import json_safe

    out = out or Path(f"{recording.stem}-segments")

    def show(s: Any) -> None:
        if not as_json or not s.prediction.ok:
            typer.echo(format_line(s.prediction), err=not s.prediction.ok)

    done = write_segments(predictor, recording, out, rule, on_segment=show)
    if as_json:
        typer.echo(json.dumps(json_safe(done), indent=2, allow_nan=False))
        return
    typer.echo(f"{done['segments']} segments, {done['segment_seconds']:.1f} s of {done['seconds']:.1f} s; wrote "
               + " and ".join(done["files"]))
    if done["failed"]:
        typer.echo(f"error: {done['failed']} segments could not be predicted", err=True)
        raise typer.Exit(code=1)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="output folder (refused if non-empty and not a previous demo)")] = Path(
        "demo-out"),
    seed: Annotated[int, typer.Option(help="seed of the synthetic corpus, the tiny WavLM and training")] = 0,
    sessions: Annotated[int, typer.Option(help="synthetic sessions (2 speakers each, one fold per speaker)")] = 3,
    utts_per_speaker: Annotated[int, typer.Option(help="synthetic utterances per speaker")] = 24,
    epochs: Annotated[int, typer.Option(help="training epochs per fold before the step plan (heads/train/step_plan.py) "
                                             "triples them on this tiny corpus")] = DEMO.epochs,
    batch_size: Annotated[int, typer.Option(help="head batch size (16: the demo corpus is tiny)")] = DEMO.batch_size,
    ensemble: Annotated[str, typer.Option(metavar="N|auto", help=f"heads per fold, averaged: a count or {AUTO} "
                                               f"(train-head's default: {AUTO_HEADS} on folds this small)")] = str(DEMO.ensemble),
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
