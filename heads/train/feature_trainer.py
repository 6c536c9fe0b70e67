"""The trainer of a head on fixed features: batches from a cache, inputs fitted on the training split.

`FeatureTrainer` is the train-head `Trainer` (heads/train/trainer.py): it says
where batches come from (by default the cache's RAM preload or its reader, or
frames normalized and mixed once) and fits what the head's input needs before
the first epoch: the `--norm train` statistics and fixed layer weights
(heads/train/layer_weights.py), then the pooled statistics' scale
(heads/train/statistics.py). A subclass may take its features from elsewhere
(override `make_loader` and `feature_shape`); the fitting passes then read its
own loaders.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from heads.config import TrainConfig
from heads.model.head import HeadOutput
from heads.model.pooling import keep_at_most, speech_frames
from heads.train.batches import make_loader, resident_copy
from heads.train.folds import FoldData
from heads.train.layer_weights import SLICE_VALUES, prepare_inputs
from heads.train.statistics import fit_pooled_norm
from heads.train.trainer import Trainer


class FeatureTrainer(Trainer):
    """Train, validate and test one fold of a head on fixed features (a `cache.reader.FeatureCache` by default)."""

    def __init__(self, config: TrainConfig, data: FoldData, *, cache: Any = None, layers: list[int] | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None) -> None:
        self.cache = cache
        super().__init__(config, data, layers=layers, on_epoch=on_epoch)

    def feature_shape(self) -> tuple[int, int]:
        return len(self.layers), int(self.cache.hidden_size)

    def make_loader(self, split: str) -> Iterable[dict]:
        c = self.config
        if not hasattr(self, "_resident"):  # the preloaded layers, copied once to the GPU when they fit there
            self._resident = resident_copy(self.cache, self.device)
        return make_loader(self.cache, self.data.split(split), layers=self.layers, vad_mode=c.vad_mode,
                           batch_size=self.batch_size(split), shuffle=split == "train", seed=c.seed,
                           resident=self._resident)

    def prepare_inputs(self) -> None:
        """Fit what the head's input needs from the training split before training (heads/train/layer_weights.py).

        `--norm train`: the normalization statistics; `--layer-weights pooled`
        (more than one layer): the layer weights, then the train and
        validation loaders are replaced by batches of frames normalized and
        mixed once. Then `--pooled-norm train`: the pooled statistics' scale
        (heads/train/statistics.py).
        """
        prepare_inputs(self)
        head = self.head(self.model)
        if head.pooled_norm.mode == "train":  # after the above: it pools what the head will see
            start = time.perf_counter()
            fit_pooled_norm(self, head)
            self.input_seconds["pooled_norm"] = time.perf_counter() - start

    def forward(self, batch: dict) -> HeadOutput:
        """The Trainer's forward; in training with `--sap-frames N`, SAP attends among at most N of each
        utterance's speech frames (all real frames when it has none), drawn at random each step, as in the
        stacked trainer (heads/train/stack.py)."""
        cap = self.config.sap_frames
        if not (self.model.training and cap and self.config.pooling in ("sap", "sr")):
            return super().forward(batch)
        features, padding, vad = self.encode(batch)
        sap_mask = keep_at_most(speech_frames(padding, vad)[0], cap)  # (B, T)
        head = self.head(self.model)
        if batch.get("mixed"):
            return head.from_mixed(features, padding, vad, sap_mask)
        return head(features, padding, vad, sap_mask)

    def pass_loader(self, split: str) -> Iterable[dict]:
        """Batches for prepare_inputs' one-off passes over a split, in order.

        From a cache: groups of utterances small enough that the longest
        batch's (B, T, L, D) float32 copy stays near `SLICE_VALUES` values
        (a training batch of 64 x 950 frames x 25 x 1024 would be 6 GB);
        otherwise the split's own loader.
        """
        if self.cache is None:
            return self.loaders[split]
        ids = self.data.split(split)
        longest = int(self.cache.meta.loc[ids, "n_frames"].max())
        batch = max(1, min(self.config.batch_size, SLICE_VALUES // (longest * len(self.layers) * self.cache.hidden_size)))
        return make_loader(self.cache, ids, layers=self.layers, vad_mode=self.config.vad_mode, batch_size=batch,
                           shuffle=False, seed=self.config.seed, resident=self._resident)

    def host_budget(self) -> int:
        """Bytes of RAM the trainer may still fill (`--memory-gb` minus what the cache preloaded)."""
        used = getattr(self.cache, "preloaded_bytes", 0) or 0
        return max(0, int(self.config.memory_gb * 2**30) - used)

