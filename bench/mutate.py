"""Mutation check: plant one-line bugs in a copy of the repository and see whether the tests notice (issue 12).

Every entry of MUTATIONS names a file, a text that occurs exactly once in it,
its replacement, and the few test files (or node ids) that should fail under
it. For each mutant the tracked tree (`git ls-files`, as it is on disk) is
copied once into a temporary folder, the one file is mutated, and
`python -m pytest -q -x -p no:cacheprovider SELECTION` runs there with a
timeout; the file is restored afterwards. Result: killed (a test failed),
survived (the selection passed: a gap in the tests, or an equivalent mutant),
or error (timeout, or pytest could not run). The unmutated selections run
once first and must pass, else nothing is measured.

The copy's code must be what runs, not this checkout's (the venv's editable
install points here): pytest starts in the copy with the copy first on
PYTHONPATH, no bytecode is written (a same-size edit within the same second
could otherwise reuse a stale .pyc), and a small pytest plugin checks at the
end of every run that each imported module of core/cache/extract/heads/cli
came from the copy; a run that imported this checkout's code stops the script.

    python bench/mutate.py                        # every mutant -> bench/results/mutation-cpu.md
    python bench/mutate.py --list                 # the table, and whether each entry still applies
    python bench/mutate.py --only ua-is-accuracy  # one mutant (repeatable), printed, no results file
    python bench/mutate.py --out /tmp/m.md --timeout 300
    python bench/mutate.py --kind split --kind align --kind option --append   # issue 27's mutants, a new
                                                  # dated section at the end of bench/results/mutation-cpu.md
    python bench/mutate.py --only NAME --tests tests/test_stack.py   # against other tests than its own

Issue 27's mutants carry a `kind`, the three ways a wrong number gets published
without a failing test: "split" (a statistic fitted with held-out speakers in
it), "align" (a per-utterance table's rows out of line with its labels),
"option" (a non-default option that never reaches its use).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "mutation-cpu.md"
PACKAGES = ("core", "cache", "extract", "heads", "sapser", "cli")
GUARD_EXIT = 77  # the guard plugin's exit status: the code under test was not the copy's


@dataclass(frozen=True)
class Mutation:
    """One planted bug: `original` (exactly once in `file`) becomes `replacement`; `tests` should catch it."""

    name: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    known: bool = False  # one of the four bugs issue 12 found the suite let through
    kind: str = ""  # issue 27's class: split | align | option (KINDS); "" for the earlier mutants


KINDS = {"split": "statistics fitted on the wrong split", "align": "rows out of line with their labels",
         "option": "a non-default option that never reaches its use"}


# The four bugs the issue found uncaught come first (known=True). Two of them live in
# heads/train/trainer.py, which the new mutants leave alone (it is being changed elsewhere).
MUTATIONS: tuple[Mutation, ...] = (
    Mutation("arousal-scored-on-valence", "heads/evaluate/metrics.py",
             "regression_metrics(va_true[:, j], va_pred[:, j])", "regression_metrics(va_true[:, j], va_pred[:, 0])",
             "arousal MAE/CCC computed from the valence predictions",
             ("tests/test_fold_outputs_agree.py",), known=True),
    Mutation("micro-batch-unweighted", "heads/finetune/trainer.py",
             'loss = loss * batch["share"]', "loss = loss",
             "fine-tuning drops the per-micro-batch loss weighting (each micro-batch counts fully)",
             ("tests/test_finetune.py::test_accumulated_micro_batches_give_the_gradient_of_the_whole_step",),
             known=True),
    Mutation("early-stop-on-tie", "heads/train/trainer.py",
             "if loss < self.best_loss:", "if loss <= self.best_loss:",
             "early stopping takes a tie in validation loss as an improvement (<= instead of <)",
             ("tests/test_head_training.py",), known=True),
    Mutation("warmup-from-zero", "heads/train/trainer.py",
             "return (step + 1) / (warmup + 1)", "return step / (warmup + 1)",
             "the warm-up starts at learning rate 0 (a wasted first step)",
             ("tests/test_head_training.py",), known=True),
    # --- core: frame grids and fold plans
    Mutation("frame-count-off-by-one", "core/frames.py",
             "return (n_samples - self.offset - self.window) // self.stride + 1",
             "return (n_samples - self.offset - self.window) // self.stride",
             "window-counted grids give one frame too few (the last full window is dropped)",
             ("tests/test_frames_folds.py", "tests/test_vad.py")),
    Mutation("vad-reads-frame-start", "core/frames.py",
             "return self.offset + self.window // 2", "return self.offset",
             "a frame's VAD decision is read at its first sample instead of its centre",
             ("tests/test_vad.py", "tests/test_frames_folds.py")),
    Mutation("val-speaker-also-trains", "core/folds.py",
             "train = tuple(s for s in speakers if s not in (test, val))",
             "train = tuple(s for s in speakers if s != test)",
             "leave-one-speaker-out trains on the validation speaker too (folds not speaker-disjoint)",
             ("tests/test_frames_folds.py",)),
    # --- extract: audio, VAD
    Mutation("resample-rates-swapped", "extract/audio.py",
             "soxr.resample(x, orig_sr, sr, quality=RESAMPLE_QUALITY)",
             "soxr.resample(x, sr, orig_sr, quality=RESAMPLE_QUALITY)",
             "resampling from 16 kHz to the file's rate instead of the other way round",
             ("tests/test_audio.py",)),
    Mutation("vad-state-shared", "extract/vad.py",
             "vad = webrtcvad.Vad(mode)", "vad = _run_vad.__dict__.setdefault(mode, webrtcvad.Vad(mode))",
             "one WebRTC VAD per mode is reused across utterances (masks depend on extraction order)",
             ("tests/test_vad.py",)),
    Mutation("vad-modes-reversed", "extract/vad.py",
             "speech = np.stack([_run_vad(pcm, mode) for mode in VAD_MODES])",
             "speech = np.stack([_run_vad(pcm, mode) for mode in sorted(VAD_MODES, reverse=True)])",
             "the four VAD masks are stored in reverse mode order (mode 3's mask under mode 0)",
             ("tests/test_vad.py", "tests/test_extract.py")),
    # --- cache: write and read
    Mutation("cache-stores-valence-as-arousal", "cache/writer.py",
             '"arousal": float(utt.arousal)', '"arousal": float(utt.valence)',
             "the cache writer stores each utterance's valence in its arousal column",
             ("tests/test_cache.py",)),
    Mutation("preload-columns-by-position", "cache/reader.py",
             "cols = [self._ram.positions.index(p) for p in pos]", "cols = pos",
             "a preloaded subset of layers is indexed by stored position, not by its column in RAM",
             ("tests/test_cache.py",)),
    Mutation("dataset-ignores-vad-mode", "cache/torch_dataset.py",
             '"vad": self.cache.vad(utt_id, self.vad_mode)', '"vad": self.cache.vad(utt_id, 0)',
             "the dataset always reads the VAD mask of mode 0, whatever --vad-mode says",
             ("tests/test_cache.py",)),
    # --- heads: pooling masks, SAP's softmax mask, input normalization, loss
    Mutation("sap-pools-all-frames", "heads/model/pooling.py",
             "mask = torch.where(no_speech[:, None], padding_mask, speech)",
             "mask = torch.where(no_speech[:, None], speech, padding_mask)",
             "SAP's fallback inverted: utterances with speech pool every real frame",
             ("tests/test_pooling.py",)),
    Mutation("gap-divides-by-padded-length", "heads/model/pooling.py",
             "return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)", "return total / weights.shape[1]",
             "the masked mean divides by the padded length instead of the real frame count",
             ("tests/test_pooling.py",)),
    Mutation("sap-flash-attends-padding", "heads/model/pooling.py",
             "attn_mask=keys[:, None, None, :]", "attn_mask=None",
             "SAP's fused-kernel path attends to padding and non-speech keys",
             ("tests/test_pooling.py",)),
    Mutation("sap-softmax-unmasked", "heads/model/pooling.py",
             "abar = mean_softmax(qk, key_bias, weights, H)",
             "abar = mean_softmax(qk, torch.zeros_like(key_bias), weights, H)",
             "SAP's chunked path drops the key mask from its softmax",
             ("tests/test_pooling.py",)),
    Mutation("norm-stats-include-validation", "heads/train/layer_weights.py",
             'if moments is not None and split == "train":', "if moments is not None:",
             "--norm train statistics also take the validation speaker's frames",
             ("tests/test_input_norm.py::test_statistics_come_from_the_training_speakers_real_frames_only",)),
    Mutation("moments-merge-drops-mean-shift", "heads/train/statistics.py",
             "self.m2 += m2.to(self.m2.device) + delta.square() * (self.count * n / total)",
             "self.m2 += m2.to(self.m2.device)",
             "merging batch moments forgets the between-batch term (std too small)",
             ("tests/test_input_norm.py",)),
    Mutation("class-weights-by-frequency", "heads/train/statistics.py",
             "w[present] = counts.sum() / (present.sum() * counts[present])",
             "w[present] = present.sum() * counts[present] / counts.sum()",
             "class weights proportional to class frequency instead of inverse",
             ("tests/test_head_training.py",)),
    Mutation("mae-over-whole-batch", "heads/model/loss.py",
             "return diff.sum(dim=0) / has.sum(dim=0).clamp(min=1).to(pred.dtype)",
             "return diff.sum(dim=0) / pred.shape[0]",
             "the masked MAE divides by the batch size, not by the utterances with a target",
             ("tests/test_head_training.py",)),
    # --- heads: fold data, fine-tuning steps, metrics
    Mutation("test-and-val-swapped", "heads/train/folds.py",
             'for r in ("test", "val", "train")', 'for r in ("val", "test", "train")',
             "a fold tests on its validation speaker and early-stops on its test speaker",
             ("tests/test_baseline.py", "tests/test_fold_outputs_agree.py")),
    Mutation("step-share-equal", "heads/finetune/waves.py",
             "share=len(p) * self.ctx.world_size / len(step)", "share=1 / len(parts)",
             "micro-batches of a step weighted equally, not by their share of its utterances",
             ("tests/test_finetune.py::test_accumulated_micro_batches_give_the_gradient_of_the_whole_step",
              "tests/test_finetune.py::test_steps_keep_the_batch_and_micro_batches_keep_the_budget")),
    Mutation("ua-is-accuracy", "heads/evaluate/metrics.py",
             "ua = balanced_accuracy_score(t, p)", "ua = accuracy_score(t, p)",
             "UA computed as plain accuracy (WA)",
             ("tests/test_metrics.py",)),
    # --- heads: predict, baseline, report
    Mutation("predict-standardized-va", "heads/predict.py",
             "va.append(head.to_corpus_scale(out.va.float())[0].cpu().numpy())", "va.append(out.va.float()[0].cpu().numpy())",
             "cli predict reports valence/arousal in standardized units, not the corpus scale",
             ("tests/test_predict.py::test_head_only_fold_predicts_what_its_predictions_csv_says",)),
    Mutation("baseline-scaler-sees-test", "heads/train/baseline.py",
             'scaler = StandardScaler().fit(train.astype(np.float64))',
             'scaler = StandardScaler().fit(np.concatenate([stats[s] for s in ("train", "val", "test")]).astype(np.float64))',
             "the baseline's feature scaler is fitted on every split, test included",
             ("tests/test_baseline.py",)),
    Mutation("report-ci-population-std", "heads/evaluate/report.py",
             "x.std(ddof=1) / math.sqrt(x.size)", "x.std() / math.sqrt(x.size)",
             "the 95% CI over folds uses the population std (ddof=0): too narrow",
             ("tests/test_report.py",)),
    # --- issue 27, class 1 (split): a statistic fitted with held-out speakers in it
    Mutation("one-layer-norm-takes-validation", "heads/train/fold_inputs.py",
             "moments.combined(data.train)", "moments.combined(data.train + data.val)",
             "a one-layer read's --norm train statistics also take the validation speaker's frames",
             ("tests/test_split_hygiene.py",), kind="split"),
    Mutation("pooled-norm-takes-validation", "heads/train/fold_inputs.py",
             'fit_pooled(template, fixed_all["train"].to(device))',
             'fit_pooled(template, torch.cat([fixed_all["train"], fixed_all["val"]]).to(device))',
             "--pooled-norm train of a layer mix is fitted on the training and validation rows",
             ("tests/test_split_hygiene.py", "tests/test_alignment.py"), kind="split"),
    Mutation("one-layer-pooled-norm-takes-validation", "heads/train/fold_inputs.py",
             'fit_pooled(template, fixed_all["train"])',
             'fit_pooled(template, torch.cat([fixed_all["train"], fixed_all["val"]]))',
             "--pooled-norm train of a one-layer read is fitted on the training and validation rows",
             ("tests/test_split_hygiene.py",), kind="split"),
    Mutation("target-scale-takes-held-out", "heads/train/fold_inputs.py",
             "template.set_target_scale(va_mean.to(device), va_std.to(device))",
             'template.set_target_scale(*target_scale(data.labels.loc[data.train + data.val + data.test]'
             '[["valence", "arousal"]].to_numpy()))',
             "a layer mix's valence/arousal scale is fitted on every split, the test speaker's included",
             ("tests/test_split_hygiene.py",), kind="split"),
    Mutation("class-weights-take-validation", "heads/train/fold_inputs.py",
             'class_weights(train["emotion"].to_numpy(), len(data.classes)).to(device), plan, {},',
             'class_weights(data.labels.loc[data.train + data.val, "emotion"].to_numpy(), '
             'len(data.classes)).to(device), plan, {},',
             "a one-layer read's class weights count the validation speaker's emotions too",
             ("tests/test_split_hygiene.py",), kind="split"),
    Mutation("joint-pooled-norm-reads-validation", "heads/train/statistics.py",
             'for batch in (loader if mixed else trainer.pass_loader("train")):',
             'for batch in (loader if mixed else trainer.pass_loader("val")):',
             "the single-head trainer fits --pooled-norm on the validation speaker's utterances",
             ("tests/test_split_hygiene.py",), kind="split"),
    Mutation("baseline-chooses-on-test", "heads/train/baseline.py",
             "model, chosen = fit_fold(split_stats, split_labels, len(data.classes), config, span=span)",
             'model, chosen = fit_fold({**split_stats, "val": split_stats["test"]}, '
             '{**split_labels, "val": split_labels["test"]}, len(data.classes), config, span=span)',
             "the baseline chooses C and alpha on the test speaker instead of the validation speaker",
             ("tests/test_split_hygiene.py", "tests/test_alignment.py"), kind="split"),
    # --- issue 27, class 2 (align): a per-utterance table out of line with its labels
    Mutation("probe-labels-out-of-order", "heads/train/layer_weights.py",
             "data.labels.loc[data.train + data.val])", "data.labels.loc[data.val + data.train])",
             "the layer probe's labels list the validation speaker first, its rows the training speakers",
             ("tests/test_alignment.py",), kind="align"),
    Mutation("probe-rows-shifted", "heads/train/layer_weights.py",
             "row = {u: i for i, u in enumerate(ids)}", "row = {u: (i + 1) % len(ids) for i, u in enumerate(ids)}",
             "the scan writes each utterance's layer means into the next utterance's row",
             ("tests/test_alignment.py",), kind="align"),
    Mutation("one-layer-rows-shifted", "heads/train/fold_inputs.py",
             "rows = torch.tensor([moments.row[u] for u in data.split(split)])",
             "rows = torch.tensor([moments.row[u] for u in data.split(split)]).roll(1)",
             "a one-layer fold's fixed statistics are shifted by one utterance against its labels",
             ("tests/test_alignment.py",), kind="align"),
    Mutation("prepared-names-reversed", "heads/train/fold_inputs.py",
             "for name, n_sap, st, f in zip(names, counts, stats.cpu(), flag.tolist()):",
             "for name, n_sap, st, f in zip(names[::-1], counts, stats.cpu(), flag.tolist()):",
             "a layer mix's fold files each batch's statistics and frames under the utterances in reverse",
             ("tests/test_alignment.py",), kind="align"),
    Mutation("stack-labels-folds-reversed", "heads/train/stack.py",
             "torch.cat([s.emotion.to(d) for s in splits]", "torch.cat([s.emotion.to(d) for s in splits[::-1]]",
             "the stack's table holds the folds' emotions in reverse fold order (a shift by whole folds)",
             ("tests/test_alignment.py",), kind="align"),
    Mutation("baseline-rows-mapped-by-another-order", "heads/train/baseline.py",
             "row = {u: i for i, u in enumerate(ids)}",
             "row = {u: i for i, u in enumerate(sorted(ids, key=lambda u: u[::-1]))}",
             "the baseline looks each utterance's statistics up in another order than they were computed in",
             ("tests/test_alignment.py",), kind="align"),
    # --- issue 27, class 3 (option): a non-default option that never reaches its use
    Mutation("predict-reads-vad-mode-3", "heads/predict.py",
             "vad = vad_masks(samples, self.encoder.grid)[self.vad_mode]",
             "vad = vad_masks(samples, self.encoder.grid)[3]",
             "cli predict on a head reads VAD mode 3 whatever mode the run trained with",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("baseline-predict-ignores-frames", "heads/predict.py",
             'use = vad if self.frames == "speech" and vad.any() else np.ones(len(x), dtype=bool)',
             "use = vad if vad.any() else np.ones(len(x), dtype=bool)",
             "cli predict on a baseline fold uses the speech frames even when it was fitted on --frames all",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("predict-ignores-max-seconds", "heads/predict.py",
             'self.max_seconds = float(fp.get("max_seconds") or 0.0)', "self.max_seconds = 0.0",
             "cli predict on a head reads whole files although the cache kept only the first --max-seconds",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("cli-predict-ignores-device", "cli.py",
             "predictor = load_predictor(run, device=device)", "predictor = load_predictor(run)",
             "cli predict --device never reaches the predictor (always the CPU)",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("baseline-reads-vad-mode-3", "heads/train/baseline.py",
             "frames=config.frames, vad_mode=config.vad_mode,", "frames=config.frames, vad_mode=3,",
             "the baseline's statistics read VAD mode 3 whatever --vad-mode says",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("baseline-folds-by-speaker", "heads/train/baseline.py",
             "datas = [fold_data(cache, k, config.protocol) for k in ks]", "datas = [fold_data(cache, k) for k in ks]",
             "the baseline numbers its folds by --protocol but builds leave-one-speaker-out folds",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("test-split-reads-vad-mode-3", "heads/train/fold_group.py",
             "loader = make_loader(cache, data.test, layers=layers, vad_mode=config.vad_mode,",
             "loader = make_loader(cache, data.test, layers=layers, vad_mode=3,",
             "train-head tests every fold with VAD mode 3's masks whatever --vad-mode it trained with",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("one-layer-moments-read-vad-mode-3", "heads/train/fold_group.py",
             "moments = cache_moments(cache, ids, layers[0], config.norm, config.vad_mode, device, budget)",
             "moments = cache_moments(cache, ids, layers[0], config.norm, 3, device, budget)",
             "a one-layer run's SAP frames and speech statistics come from VAD mode 3 whatever --vad-mode says",
             ("tests/test_options_reach.py", "tests/test_alignment.py"), kind="option"),
    Mutation("plan-ignores-grad-accum", "heads/train/step_plan.py",
             "n_train * epochs // (min_steps * grad_accum)", "n_train * epochs // min_steps",
             "the step plan shrinks the batch as if every micro-batch were an optimizer step",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("stack-schedule-counts-micro-batches", "heads/train/stack.py",
             "lr_factor(folds[s.fold].plan.epochs * math.ceil(s.steps_per_epoch / c.grad_accum),",
             "lr_factor(folds[s.fold].plan.epochs * s.steps_per_epoch,",
             "the stack's warm-up and cosine span micro-batches, not optimizer steps, under gradient accumulation",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("stack-patience-from-config", "heads/train/stack.py",
             "if s.early.update(s.epoch, val_loss[h], f.plan.patience):",
             "if s.early.update(s.epoch, val_loss[h], self.config.patience):",
             "the stack's early stopping waits the configured patience, not the one the step plan grew",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("stack-ignores-sap-frames", "heads/train/stack.py",
             "cap = self.config.sap_frames", "cap = None",
             "--sap-frames never reaches the stack: SAP attends to every frame in training",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("resume-loads-oldest", "heads/finetune/checkpoint.py",
             "for d in reversed(dirs):", "for d in dirs:",
             "a resume with two complete checkpoints loads the older one",
             ("tests/test_options_reach.py",
              "tests/test_finetune.py::test_resume_after_an_interruption_equals_the_uninterrupted_run"), kind="option"),
    Mutation("checkpoints-ordered-by-name", "heads/finetune/checkpoint.py",
             "found.append((int(m.group(1)), p))", "found.append((m.group(1), p))",
             "checkpoint folders are ordered by name, so epoch 10000 sorts before epoch 9999",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("predict-flags-by-speaker-folds", "core/folds.py",
             'f.get("protocol", protocol)', '"speaker"',
             "a run's recorded folds are read back as leave-one-speaker-out whatever its --protocol",
             ("tests/test_options_reach.py",), kind="option"),
    Mutation("baselines-paired-across-fold-plans", "heads/evaluate/compare.py",
             'key = ("fingerprint", "folds", "classes")', 'key = ("fingerprint", "classes")',
             "a run is compared with a baseline made on another fold plan (fold K is another held-out group)",
             ("tests/test_options_reach.py",), kind="option"),
)
LEAD_OWNED = ("heads/config.py", "heads/train/trainer.py", "heads/train/fold_loop.py")  # only the known bugs may target these


def problem(m: Mutation, root: Path = ROOT) -> str | None:
    """Why `m` cannot be planted in the tree at `root` (one line), or None."""
    path = root / m.file
    if not path.is_file():
        return f"{m.name}: {m.file} does not exist"
    if m.original == m.replacement:
        return f"{m.name}: the replacement equals the original"
    if "\n" in m.original or "\n" in m.replacement:
        return f"{m.name}: not a one-line mutation"
    if m.file in LEAD_OWNED and not m.known:
        return f"{m.name}: {m.file} is off limits to new mutants"
    count = path.read_text().count(m.original)
    if count != 1:
        return f"{m.name}: the original text occurs {count} times in {m.file}, not exactly once"
    return None


def mutated(m: Mutation, text: str) -> str:
    return text.replace(m.original, m.replacement, 1)


# --------------------------------------------------------------------------- the copy


GUARD = '''"""Fails the run when a module of the project was imported from outside the mutated copy."""
import os
import sys

ROOT = os.path.realpath(os.environ["SAPSER_MUTATE_ROOT"])
PACKAGES = {packages!r}


def outside() -> list[str]:
    out = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.split(".")[0] in PACKAGES and file and not os.path.realpath(file).startswith(ROOT + os.sep):
            out.append(f"{{name}} from {{file}}")
    return out


def pytest_sessionfinish(session, exitstatus):
    bad = outside()
    imported = sorted({{n.split(".")[0] for n in sys.modules if n.split(".")[0] in PACKAGES}})
    if bad or not imported:
        sys.stderr.write("MUTATE-GUARD: " + ("; ".join(bad) or "no project module was imported") + "\\n")
        session.exitstatus = {exit}
'''


def tracked_copy(dest: Path) -> None:
    """The tracked files of the checkout, as they are on disk (uncommitted edits included), under `dest`."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True).stdout
    for name in filter(None, names.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def environment(copy: Path, guard_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(guard_dir)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["SAPSER_MUTATE_ROOT"] = str(copy)
    return env


def check_imports(copy: Path, env: dict[str, str]) -> None:
    """Stop unless `import heads` (and the other packages) resolve to the copy in the runs' environment."""
    code = "import sys, cli, core, cache, extract, heads; print('\\n'.join(sys.modules[n].__file__ for n in " \
           f"{PACKAGES[:4] + ('cli',)!r}))"
    files = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    wrong = [f for f in files if not os.path.realpath(f).startswith(os.path.realpath(copy) + os.sep)]
    if wrong or len(files) != 5:
        sys.exit(f"mutate: the copy's code is not the code under test ({', '.join(wrong) or files})")


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    result: str  # killed | survived | error | baseline-failed
    seconds: float
    caught_by: str = ""
    detail: str = ""


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_pytest(copy: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float) -> Outcome:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "mutate_guard", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return Outcome("error", time.perf_counter() - start, detail=f"timeout after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == GUARD_EXIT or "MUTATE-GUARD:" in output:
        line = next(x for x in output.splitlines() if "MUTATE-GUARD:" in x) if "MUTATE-GUARD:" in output else ""
        sys.exit(f"mutate: the code under test is not the copy's: {line}")
    failed = FAILED.findall(output)
    if proc.returncode == 0:
        return Outcome("survived", seconds)
    if proc.returncode == 1 or (proc.returncode == 2 and failed):
        # 2 with ERROR lines: a collection error (the mutant broke an import), which fails the tests too
        return Outcome("killed", seconds, failed[0][1] if failed else "(no FAILED line)")
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Outcome("error", seconds, detail=f"pytest exit {proc.returncode}: {tail[:300]}")


def run_mutant(m: Mutation, copy: Path, env: dict[str, str], timeout: float) -> Outcome:
    path = copy / m.file
    original = path.read_text()
    path.write_text(mutated(m, original))
    try:
        return run_pytest(copy, env, m.tests, timeout)
    finally:
        path.write_text(original)


def selection(mutants: list[Mutation]) -> tuple[str, ...]:
    """The union of the mutants' tests, whole files first so a node id inside one is not run twice."""
    files = {t for m in mutants for t in m.tests if "::" not in t}
    nodes = {t for m in mutants for t in m.tests if "::" in t and t.split("::")[0] not in files}
    return tuple(sorted(files) + sorted(nodes))


# --------------------------------------------------------------------------- the report


def commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    sys.path.insert(0, str(ROOT))
    from bench.machine import cpu_name

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {os.cpu_count()} cores (load average {load:.1f} at the end); Python " \
           f"{platform.python_version()}"


def kill_rate(rows: list[tuple[Mutation, Outcome]], known: bool | None = None, kind: str | None = None) -> str:
    part = [o for m, o in rows if (known is None or m.known == known) and (kind is None or m.kind == kind)]
    return f"{sum(o.result == 'killed' for o in part)}/{len(part)}"


def tally(rows: list[tuple[Mutation, Outcome]]) -> str:
    """The kill rates, one phrase per group of mutants that the run holds."""
    parts = []
    if any(m.known for m, _ in rows):
        parts.append(f"the four bugs issue 12 found uncaught {kill_rate(rows, known=True)}")
    if any(not m.known and not m.kind for m, _ in rows):
        parts.append(f"issue 12's new mutants {kill_rate(rows, known=False, kind='')}")
    parts += [f"{kind} ({what}) {kill_rate(rows, kind=kind)}" for kind, what in KINDS.items()
              if any(m.kind == kind for m, _ in rows)]
    return ", ".join(parts) + f"; all {kill_rate(rows)}"


def report(rows: list[tuple[Mutation, Outcome]], baseline: Outcome, wall: float, command: str, *,
           section: bool = False) -> str:
    """The results as markdown: a whole file, or (`section`) a dated section to append to one."""
    kinds = sorted({m.kind for m, _ in rows if m.kind}, key=list(KINDS).index)
    title = "Mutation check: one-line bugs planted in a copy, caught by the tests?"
    title += f" (issue 27: {', '.join(kinds)})" if kinds else " (issue 12)"
    now = datetime.now(timezone.utc)
    lines = [
        ("## " if section else "# ") + f"{now:%Y-%m-%d}: {title}",
        "",
        f"- Date: {now:%Y-%m-%d %H:%M} UTC",
        f"- Commit: {commit()}",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        "",
        f"Killed: {tally(rows)}. Unmutated selection: {baseline.result} in {baseline.seconds:.0f} s; "
        f"whole run {wall / 60:.1f} min.",
        "",
        "| mutation | kind | file | what it breaks | caught by | result | s |",
        "|---|---|---|---|---|---|---:|",
    ]
    for m, o in rows:
        name = f"{m.name} (known)" if m.known else m.name
        caught = f"`{o.caught_by}`" if o.caught_by else "-"
        result = o.result + (f": {o.detail}" if o.detail else "")
        lines.append(f"| {name} | {m.kind or '-'} | {m.file} | {m.description} | {caught} | {result} | "
                     f"{o.seconds:.0f} |")
    lines += ["", "Each mutant ran `python -m pytest -q -x -p no:cacheprovider` on its selection (the entries of "
              "`MUTATIONS` in bench/mutate.py) in a copy of the tracked tree, with the copy's modules checked to be "
              "the ones imported.", ""]
    return "\n".join(lines)


def list_table() -> int:
    bad = 0
    for m in MUTATIONS:
        why = problem(m)
        bad += why is not None
        state = f"REFUSED: {why}" if why else "applies"
        print(f"{m.name:34s} {m.file:26s} {'known ' if m.known else ''}{m.kind + ' ' if m.kind else ''}{state}\n"
              f"    {m.description}\n    tests: {' '.join(m.tests)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the table and whether each entry applies")
    parser.add_argument("--kind", action="append", choices=list(KINDS),
                        help="run only issue 27's mutants of this class (repeatable)")
    parser.add_argument("--out", type=Path, help=f"results file (default {RESULTS.relative_to(ROOT)} for a full run "
                                                 "or with --append; else printed only)")
    parser.add_argument("--append", action="store_true",
                        help="add the results as a dated section at the end of the results file, not replace it")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="run every chosen mutant against these test files or node ids instead of its own "
                             "(e.g. the suite before a mutant's tests were written)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    opts = parser.parse_args(argv)
    if opts.list:
        return list_table()
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(opts.only or ()) - names)
    if unknown:
        parser.error(f"no mutant named {', '.join(unknown)}; see --list")
    mutants = [m for m in MUTATIONS
               if (not opts.only or m.name in opts.only) and (not opts.kind or m.kind in opts.kind)]
    refused = [why for m in mutants if (why := problem(m))]
    if refused:
        sys.exit("mutate: refusing to run: " + "; ".join(refused))
    if opts.tests:
        mutants = [replace(m, tests=tuple(opts.tests)) for m in mutants]
    full = not (opts.only or opts.kind or opts.tests)  # only a full run replaces the results file by default
    out = opts.out or (RESULTS if full or opts.append else None)
    command = "python bench/mutate.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sapser-mutate-") as tmp:
        copy, guard_dir = Path(tmp) / "tree", Path(tmp) / "guard"
        guard_dir.mkdir()
        (guard_dir / "mutate_guard.py").write_text(GUARD.format(packages=PACKAGES, exit=GUARD_EXIT))
        tracked_copy(copy)
        env = environment(copy, guard_dir)
        check_imports(copy, env)
        tests = selection(mutants)
        print(f"unmutated: {' '.join(tests)}", flush=True)
        baseline = run_pytest(copy, env, tests, opts.timeout * max(1, len(mutants)))
        if baseline.result != "survived":
            sys.exit(f"mutate: the unmutated selection does not pass ({baseline.result}: "
                     f"{baseline.caught_by or baseline.detail}); fix that first")
        baseline.result = "passed"
        print(f"unmutated: passed in {baseline.seconds:.0f} s", flush=True)
        rows = []
        for m in mutants:
            outcome = run_mutant(m, copy, env, opts.timeout)
            rows.append((m, outcome))
            print(f"{m.name}: {outcome.result} in {outcome.seconds:.0f} s {outcome.caught_by or outcome.detail}",
                  flush=True)
    wall = time.perf_counter() - start
    text = report(rows, baseline, wall, command, section=opts.append and out is not None and out.exists())
    print(f"killed: {tally(rows)}; {wall / 60:.1f} min")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if opts.append and out.exists():
            out.write_text(out.read_text().rstrip("\n") + "\n\n" + text)
        else:
            out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
