"""Many heads trained as one computation: every fold of a run and every member of its ensembles.

The folds of a run and the members of an ensemble share the cache and differ
only in which utterances they train on and their seed. So they are one
computation here: their trainable weights are stacked along a leading head
axis `H`, one forward and backward pass per step computes every head's loss on
its own batch, and one AdamW update moves all of them, each with its own
learning-rate schedule, step count, early stopping, best-epoch weights and
history. What does not depend on trainable weights was computed once per fold
(heads/train/fold_inputs.py): the pooled vector's fixed statistics, and the
frames SAP attends to. So a GAP head's step reads no frame at all, and an
SAP/SR step runs only SAP's attention over the speech frames.

Each head is the single-head computation of heads/train/trainer.py:
- its initial weights are `SERHead`'s under `torch.manual_seed(seed)`;
- its batches are `BucketBatchSampler(seed, epoch)`'s, of the step plan's size
  (heads/train/step_plan.py), shorter heads' batches padded with rows that carry
  no target and no weight;
- its learning rate follows `warmup_cosine` over its own optimizer steps, and
  AdamW's update is torch's, per head;
- its dropout masks come from its own generator, seeded with its seed;
- validation after each of its epochs, on its fold's validation speaker, over
  the whole split at once; early stopping on that loss; the best epoch's
  weights kept (the `--ema` average's, when asked).
A head's result does not depend on which other heads share the stack (tested:
a fold trained alone and in a run of all folds give the same predictions
within float tolerance). The test speaker is then predicted through the full
path, `SERHead.forward` on every cached layer, as `cli predict` runs it.

SAP's attention over a stack of utterances of different lengths: when every
row holds about as many frames as the longest (`--sap-frames` caps them), the
step's frames are one padded block `(H, B*S, D)` whose query/key projections
(one batched matmul) feed the attention as they lie. Otherwise they are packed
per head `(H, F, D)`, no padding between utterances, projected, then sorted by
length into groups of similar length (`length_groups`) for the attention, so
little of it is spent on padding.

The weights are held in the layout the step computes with (`to_stack`):
matrices input-major, the attention's input projection as two leaves (queries
and keys; values), so every gradient arrives in its parameter's own layout.
`head()` gives them back as `SERHead`'s (`from_stack`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from core.heap import kept_heap
from heads.evaluate.metrics import ua_wa
from heads.model.head import SERHead
from heads.model.pooling import attendable_keys, flash_pays, mean_softmax
from heads.train.batches import BucketBatchSampler
from heads.train.fold_inputs import FoldInputs, build_head
from heads.train.statistics import TrainingError
from heads.train.trainer import EarlyStop, lr_factor

BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, as the single-head trainer uses
EPS = 1e-8
GROUP_WASTE = 1.15  # a length group's padded attention cost may exceed its real cost by this factor


@dataclass
class HeadState:
    """One head's training record inside the stack."""

    fold: int  # index into the stack's folds
    seed: int
    steps_per_epoch: int  # micro-batches of an epoch
    sampler: BucketBatchSampler
    generator: torch.Generator  # its dropout masks
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    micro: int = 0  # micro-batches of the current epoch taken
    batches: Iterator[list[int]] | None = None
    loss_sum: float = 0.0
    loss_count: int = 0
    epoch_lr: float = 0.0
    early: EarlyStop = field(default_factory=EarlyStop)
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None
    done: bool = False


class Stack:
    """The trainable weights of H heads `(H, ...)`, their optimizer state and one training step for all."""

    def __init__(self, folds: list[FoldInputs], heads: list[tuple[int, int]], device: torch.device) -> None:
        """`heads`: (index into `folds`, seed) per head."""
        self.folds = folds
        self.device = device
        self.config = folds[0].config
        c = self.config
        self.templates = [f.template for f in folds]
        first = self.templates[0]
        self.pooling, self.hidden = c.pooling, first.input_size
        self.sap_prefix = {"sap": "pool.", "sr": "pool.sap."}.get(c.pooling)
        self.n_heads = first.pool.sap.heads if c.pooling == "sr" else getattr(first.pool, "heads", 1)
        # every fold's SAP frames in one tensor, each fold from its offset on; folds of a one-layer read
        # share one tensor of frames (heads/train/fold_inputs.py CacheMoments) and differ in their affine norm
        if all(f.frames is folds[0].frames for f in folds):
            self.offsets, self.frames = [0] * len(folds), folds[0].frames.to(device)
        else:
            self.offsets = np.cumsum([0] + [len(f.frames) for f in folds[:-1]]).tolist()
            self.frames = torch.cat([f.frames.to(device) for f in folds])
        d = first.input_size
        self.scale = torch.stack([f.affine[0] if f.affine else torch.ones(d) for f in folds]).float().to(device)
        self.shift = torch.stack([f.affine[1] if f.affine else torch.zeros(d) for f in folds]).float().to(device)
        shape = (first.mix.n_layers, first.input_size)
        members = []
        for fold, seed in heads:
            torch.manual_seed(seed)  # the single-head trainer's seeding, so the same initial weights
            members.append(build_head(c, shape, len(folds[fold].data.classes)))
        names = [n for n, p in members[0].named_parameters() if p.requires_grad and not n.startswith("mix.")]
        stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in members]) for n in names}
        self.params = {n: p.to(device).requires_grad_(True)
                       for n, p in to_stack(stacked, self.n_heads).items()}  # (H, ...)
        self.names = list(self.params)
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.ema = {n: torch.zeros_like(p) for n, p in self.params.items()} if c.ema > 0 else None
        self.states = []
        for fold, seed in heads:
            f = folds[fold]
            sampler = BucketBatchSampler(f.splits["train"].frames, f.plan.batch_size, shuffle=True, seed=seed)
            self.states.append(HeadState(fold, seed, len(sampler), sampler, torch.Generator().manual_seed(seed)))
        self.factors = [lr_factor(folds[s.fold].plan.epochs * math.ceil(s.steps_per_epoch / c.grad_accum),
                                  c.warmup_ratio) for s in self.states]
        self.fixed_width = folds[0].splits["train"].fixed.shape[1]
        self.class_weights = torch.stack([f.class_weights for f in folds])  # (n_folds, C)
        self.tables = {split: self.table(split) for split in ("train", "val")}

    # ---- the forward pass of a set of heads on their rows ----

    def weights(self, heads: torch.Tensor, source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights of `heads` (a (A,) index), from the trained ones or from `source` (e.g. the average)."""
        source = self.params if source is None else source
        if len(heads) == len(self.states) and bool((heads == torch.arange(len(self.states))).all()):
            return source
        return {n: p[heads.to(p.device)] for n, p in source.items()}

    def forward(self, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], *, train: bool,
                generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (A, B, C), valence/arousal (A, B, 2) standardized) of A heads on their rows.

        `rows`: "fixed" (A, B, F) standardized fixed statistics, "start"/"count" (A, B) SAP frames in
        self.frames (count 0 on padded rows).
        """
        fixed = rows["fixed"]
        parts = []
        if self.sap_prefix is not None:
            cap = self.config.sap_frames
            sap = self.sap(w, rows["start"], rows["count"], rows["affine"], cap=cap, generators=generators)  # (A, B, D)
            parts = [sap, fixed] if self.pooling == "sap" else [fixed[..., : self.hidden], sap, fixed[..., self.hidden :]]
        pooled = torch.cat(parts, dim=-1) if parts else fixed  # (A, B, P)
        c = self.config
        if train and c.pooled_dropout > 0:
            pooled = pooled * self.dropout_mask(pooled.shape, c.pooled_dropout, generators)
        z = F.gelu(torch.baddbmm(w["proj.0.bias"][:, None], pooled, w["proj.0.weight"]))  # (A, B, proj)
        if train and c.dropout > 0:
            z = z * self.dropout_mask(z.shape, c.dropout, generators)
        logits = torch.baddbmm(w["classifier.bias"][:, None], z, w["classifier.weight"])  # (A, B, C)
        va = torch.baddbmm(w["regressor.bias"][:, None], z, w["regressor.weight"])  # (A, B, 2)
        return logits, va

    def dropout_mask(self, shape: torch.Size, p: float, generators: list[torch.Generator]) -> torch.Tensor:
        """(A, B, X): each head's inverted-dropout mask from its own generator (as nn.Dropout scales it)."""
        masks = [torch.empty(shape[1:]).bernoulli_(1 - p, generator=g) for g in generators]
        return torch.stack(masks).to(self.device) / (1 - p)

    def sap(self, w: dict[str, torch.Tensor], start: torch.Tensor, count: torch.Tensor,
            affine: tuple[torch.Tensor, torch.Tensor] | None = None, *, cap: int | None = None,
            generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """SAP (eqs. 3-5) of each head on its rows: `(A, B, D)`; rows with count 0 give 0.

        The same function as `SAP.mean_attention` per head (tested), its projections batched over heads.
        `affine`: (scale (A, D), shift (A, D)) that each head's frames still need (a one-layer read's input
        normalization, heads/train/fold_inputs.py). `cap`: a row with more SAP frames attends among `cap` of
        them drawn at random (each head from its own generator), in their order (`--sap-frames`, training only).

        Two layouts of the frames for the projections: when every row has about the longest row's count
        (`--sap-frames` caps them all), one padded `(A, B, S, D)` block whose projections feed the attention
        as they are; otherwise each head's frames packed `(A, F, D)` and regrouped by length (`length_groups`).
        """
        a, b = start.shape
        d_model, nh = self.hidden, self.n_heads
        d = d_model // nh
        pre = self.sap_prefix
        w_qk, b_qk = w[pre + QK + "weight"], w[pre + QK + "bias"]  # (A, D, 2D), (A, 2D) queries and keys
        w_v, b_v = w[pre + V + "weight"], w[pre + V + "bias"]  # (A, nh, D, d), (A, D)
        w_out, b_out = w[pre + "mhsa.out_proj.weight"], w[pre + "mhsa.out_proj.bias"]  # (A, D, D), (A, D)
        frame_ids = None
        if cap is not None and bool((count > cap).any()):
            frame_ids, count = sample_frames(start, count, cap, generators)  # None: evenly spaced (validation)
        flat_count = count.reshape(-1)  # (A*B,)
        longest = int(flat_count.max())
        if longest == 0:  # no row has a frame (all padding)
            return self.frames.new_zeros((a, b, d_model), dtype=torch.float32)
        # frame f of the step: its row, its place in the row, its row in self.frames
        row_of = torch.repeat_interleave(torch.arange(a * b, device=count.device), flat_count)  # (n,)
        row_first = torch.cumsum(flat_count, 0) - flat_count  # (A*B,) first frame of each row, rows in order
        within = torch.arange(len(row_of), device=count.device) - row_first[row_of]  # (n,)
        if frame_ids is None:  # every SAP frame of each row, in order
            frame_ids = start.reshape(-1)[row_of] + within
        padded = a * b * longest <= GROUP_WASTE * len(row_of)
        if padded:  # row r's frames at slots r*S ...
            per_head, slot = b * longest, row_of * longest + within
        else:  # each head's rows one after another, no gap
            heads = count.sum(dim=1)  # (A,)
            head_of = row_of // b
            head_first = torch.cumsum(heads, 0) - heads  # (A,)
            per_head = int(heads.max())
            slot = head_of * per_head + row_first[row_of] - head_first[head_of] + within
            base = (torch.arange(a, device=count.device) * per_head)[:, None] + \
                (row_first.view(a, b) - head_first[:, None])  # (A, B) each row's first slot
        x = self.frames.new_zeros((a * per_head, d_model), dtype=torch.float32)
        x[slot] = self.frames[frame_ids].float()
        x = x.view(a, per_head, d_model)  # (A, F, D)
        if affine is not None:
            x.mul_(affine[0][:, None]).add_(affine[1][:, None])
        real = flat_count.nonzero().squeeze(1)  # rows with frames
        use_flash = flash_pays(int(flat_count[real].float().mean()), d_model)
        width = 3 if use_flash else 2  # the chunked formulation projects only queries and keys per frame
        if use_flash:
            w_in = torch.cat([w_qk, w_v.permute(0, 2, 1, 3).reshape(a, d_model, d_model)], dim=2)  # (A, D, 3D)
            b_in = torch.cat([b_qk, b_v], dim=1)  # (A, 3D)
        else:
            w_in, b_in = w_qk, b_qk
        proj = torch.baddbmm(b_in[:, None], x, w_in).view(-1, width * d_model)  # (A*F, 2D or 3D)
        xf = x.view(-1, d_model)  # (A*F, D)
        groups = [None] if padded else length_groups(flat_count, real)
        done, parts, masses = [], [], []
        for rows in groups:
            if rows is None:  # the padded block: every row, as it lies
                rows, s = torch.arange(a * b, device=count.device), longest
                qkv, frames = proj.view(a * b, s, width * d_model), xf.view(a * b, s, d_model)
                mask = torch.arange(s, device=count.device)[None, :] < flat_count[:, None]  # (A*B, S)
            else:
                s = int(flat_count[rows].max())
                t = torch.arange(s, device=count.device)
                mask = t[None, :] < flat_count[rows][:, None]  # (n_g, S)
                first = base.view(-1)[rows][:, None]
                index = torch.where(mask, first + t[None, :], first)  # (n_g, S) slots in x
                qkv, frames = proj[index], xf[index]
            keys = attendable_keys(mask)
            weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (n_g, S) the mean over queries
            if use_flash:
                heads_qkv = qkv.view(len(rows), s, 3, nh, d).permute(2, 0, 3, 1, 4)  # (3, n_g, nh, S, d)
                h = F.scaled_dot_product_attention(*heads_qkv, attn_mask=keys[:, None, None, :])  # (n_g, nh, S, d)
                parts.append(torch.einsum("nhsd,ns->nhd", h, weights))  # (n_g, nh, d)
            else:
                bias = torch.zeros(len(rows), 1, 1, s, dtype=x.dtype, device=x.device)
                bias.masked_fill_(~keys[:, None, None, :], float("-inf"))
                abar = mean_softmax(qkv, bias, weights, nh)  # (n_g, nh, S)
                parts.append(torch.einsum("nhs,nsd->nhd", abar, frames))  # (n_g, nh, D)
                masses.append(abar.sum(-1))  # (n_g, nh)
            done.append(rows)
        if padded:
            mean, mass = parts[0], masses[0] if masses else None
        else:
            order = torch.cat(done)  # every row with frames, once
            mean = x.new_zeros((a * b,) + parts[0].shape[1:]).index_put((order,), torch.cat(parts))
            mass = x.new_zeros(a * b, nh).index_put((order,), torch.cat(masses)) if masses else None
        if use_flash:  # (A*B, nh, d): heads concatenated as in nn.MultiheadAttention
            mean = mean.view(a, b, d_model)
        else:  # (A*B, nh, D) attention-weighted frames per head, then each head's value projection
            z = mean.view(a, b, nh, d_model).transpose(1, 2)  # (A, nh, B, D)
            v = (z @ w_v).transpose(1, 2) + b_v.view(a, 1, nh, d) * mass.view(a, b, nh, 1)  # (A, B, nh, d)
            mean = v.reshape(a, b, d_model)
        out = torch.baddbmm(b_out[:, None], mean, w_out)  # (A, B, D)
        return out * (count > 0)[..., None].to(out.dtype)

    def losses(self, logits: torch.Tensor, va: torch.Tensor, emotion: torch.Tensor, va_true: torch.Tensor,
               folds: torch.Tensor) -> torch.Tensor:
        """(A,) each head's multi-task loss (heads/model/loss.py's, per head): weighted CE + MAE of valence, arousal."""
        c = self.config
        has = emotion >= 0  # (A, B)
        target = emotion.clamp(min=0)
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)  # (A, B)
        w = torch.gather(self.class_weights[folds], 1, target) * has.to(logits.dtype)  # (A, B)
        ce = (w * nll).sum(dim=1) / w.sum(dim=1).clamp(min=1e-12)
        finite = torch.isfinite(va_true)  # (A, B, 2)
        diff = (va - torch.where(finite, va_true, va.detach())).abs() * finite.to(va.dtype)
        mae = diff.sum(dim=1) / finite.sum(dim=1).clamp(min=1).to(va.dtype)  # (A, 2)
        return c.alpha * ce + c.beta * mae[:, 0] + c.gamma * mae[:, 1]

    # ---- rows of a split for a set of heads ----

    def rows(self, heads: list[int], split: str, picks: list[list[int]]) -> dict[str, torch.Tensor]:
        """The tensors of rows `picks[i]` of split `split` of head heads[i]'s fold, padded to one batch width
        (padded rows: no frames, no target)."""
        table, first = self.tables[split]
        pad = len(table["count"]) - 1  # the table's last row is the padding row
        width = max(len(p) for p in picks)
        index = [[first[self.states[h].fold] + i for i in pick] + [pad] * (width - len(pick))
                 for h, pick in zip(heads, picks)]
        idx = torch.tensor(index, device=self.device)  # (A, B)
        out = {name: column[idx] for name, column in table.items()}
        folds = torch.tensor([self.states[h].fold for h in heads], device=self.device)
        out["affine"] = (self.scale[folds], self.shift[folds])
        return out

    def table(self, split: str) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Every fold's rows of a split in one table (fold after fold, then one padding row) and where each fold starts."""
        splits = [f.splits[split] for f in self.folds]
        first = np.cumsum([0] + [len(s.utt_id) for s in splits[:-1]]).tolist()
        d = self.device
        cat = {
            "fixed": torch.cat([s.fixed.to(d) for s in splits] + [torch.zeros(1, self.fixed_width, device=d)]),
            "start": torch.cat([s.start.to(d) + o for s, o in zip(splits, self.offsets)] + [torch.zeros(1, dtype=torch.long, device=d)]),
            "count": torch.cat([s.count.to(d) for s in splits] + [torch.zeros(1, dtype=torch.long, device=d)]),
            "emotion": torch.cat([s.emotion.to(d) for s in splits] + [torch.full((1,), -1, dtype=torch.long, device=d)]),
            "va": torch.cat([s.va.to(d) for s in splits] + [torch.full((1, 2), float("nan"), device=d)]),
        }
        return cat, first

    # ---- training ----

    def train(self, on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """Train every head until its epochs run out or its validation loss stops improving."""
        with kept_heap() if self.device.type == "cpu" else nullcontext():  # core/heap.py
            self.train_steps(on_epoch)

    def train_steps(self, on_epoch: Callable[[int, dict[str, float]], None] | None) -> None:
        c = self.config
        while True:
            active = [h for h, s in enumerate(self.states) if not s.done]
            if not active:
                return
            picks = []
            for h in active:
                s = self.states[h]
                if s.batches is None:  # a new epoch
                    s.sampler.set_epoch(s.epoch + 1)
                    s.batches, s.micro, s.loss_sum, s.loss_count = iter(s.sampler), 0, 0.0, 0
                    s.epoch_lr = c.lr * self.factors[h](s.step)
                picks.append(next(s.batches))
            self.step(active, picks)
            ended = []
            for h in active:
                s = self.states[h]
                s.micro += 1
                if s.micro == s.steps_per_epoch:
                    s.batches = None
                    ended.append(h)
            if ended:
                self.end_epochs(ended, on_epoch)

    def step(self, active: list[int], picks: list[list[int]]) -> None:
        """One micro-batch of each active head, and the optimizer update of those whose step it ends."""
        c = self.config
        heads = torch.tensor(active)
        w = self.weights(heads)
        rows = self.rows(active, "train", picks)
        folds = torch.tensor([self.states[h].fold for h in active])
        logits, va = self.forward(w, rows, train=True, generators=[self.states[h].generator for h in active])
        loss = self.losses(logits, va, rows["emotion"], rows["va"], folds.to(self.device))  # (A,)
        values = loss.detach().tolist()
        for h, value, pick in zip(active, values, picks):
            if not math.isfinite(value):
                s = self.states[h]
                names = self.folds[s.fold].splits["train"].utt_id
                ids = ", ".join(names[i] for i in pick[:5]) + (" ..." if len(pick) > 5 else "")
                raise TrainingError(f"fold {self.folds[s.fold].fold}: the loss became {value} at epoch {s.epoch + 1}, "
                                    f"batch {s.micro + 1} (utterances {ids}); stopping this fold")
        (loss.sum() / c.grad_accum).backward()
        stepping = []
        for h, value in zip(active, values):
            s = self.states[h]
            s.loss_sum += value
            s.loss_count += 1
            if (s.micro + 1) % c.grad_accum == 0 or s.micro + 1 == s.steps_per_epoch:
                stepping.append(h)
        if stepping:
            self.update(stepping)

    @torch.no_grad()
    def update(self, heads: list[int]) -> None:
        """AdamW on the given heads (torch.optim.AdamW's arithmetic, each head at its own rate and step).

        One fused kernel call per learning rate (the heads of a fold share their schedule) over the heads'
        views: each parameter, gradient and moment is read and written once (at D = 1,024 a head holds
        ~4 M attention weights; the stack's update is memory-bound)."""
        c = self.config
        by_lr: dict[float, list[int]] = {}
        for h in heads:
            by_lr.setdefault(c.lr * self.factors[h](self.states[h].step), []).append(h)
            self.states[h].step += 1
        for lr, group in by_lr.items():
            counts = torch.tensor([float(self.states[h].step) for h in group], device=self.device)  # as the kernel reads them
            views = [(self.params[n].data[h], self.params[n].grad[h], self.exp_avg[n][h], self.exp_avg_sq[n][h],
                      counts[i]) for i, h in enumerate(group) for n in self.names]
            params, grads, avgs, squares, steps = map(list, zip(*views))
            torch._fused_adamw_(params, grads, avgs, squares, [], steps, lr=lr, beta1=BETAS[0], beta2=BETAS[1],
                                weight_decay=c.weight_decay, eps=EPS, amsgrad=False, maximize=False)
            if self.ema is not None:
                torch._foreach_lerp_([self.ema[n][h] for h in group for n in self.names], params, 1 - c.ema)
        if len(heads) == len(self.states):  # the usual case: the next backward's gradients are taken as they come
            for p in self.params.values():
                p.grad = None
        else:
            idx = torch.tensor(heads, device=self.device)
            for p in self.params.values():
                p.grad.index_fill_(0, idx, 0.0)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The `--ema` weights of every head: the bias-corrected running averages (heads/train/weight_average.py)."""
        steps = torch.tensor([s.step for s in self.states], dtype=torch.float64)
        scale = 1 - self.config.ema ** steps
        return {n: e / scale.to(e.dtype).to(self.device).view((-1,) + (1,) * (e.dim() - 1))
                for n, e in self.ema.items()}

    @torch.no_grad()
    def end_epochs(self, heads: list[int], on_epoch: Callable[[int, dict[str, float]], None] | None) -> None:
        """Validate the heads that finished an epoch; early stopping; keep the best weights."""
        source = self.averaged() if self.ema is not None else None
        val_loss, val_pred = self.evaluate(heads, "val", source)
        for h in heads:
            s = self.states[h]
            s.epoch += 1
            f = self.folds[s.fold]
            if not math.isfinite(val_loss[h]):
                raise TrainingError(f"fold {f.fold}: the validation loss became {val_loss[h]} at epoch {s.epoch}; "
                                    "stopping this fold")
            ua, wa = ua_wa(f.splits["val"].emotion.cpu().numpy(), val_pred[h], len(f.data.classes))
            row = {"epoch": s.epoch, "train_loss": s.loss_sum / max(s.loss_count, 1), "val_loss": val_loss[h],
                   "val_ua": ua, "val_wa": wa, "lr": s.epoch_lr}
            s.history.append(row)
            if s.early.update(s.epoch, val_loss[h], f.plan.patience):
                weights = self.params if source is None else source
                s.best = {n: p[h].detach().clone() for n, p in weights.items()}
            s.done = s.epoch >= f.plan.epochs or s.early.stopped
            if on_epoch:
                on_epoch(h, {**row, "epochs": f.plan.epochs})

    @torch.no_grad()
    def evaluate(self, heads: list[int], split: str, source: dict[str, torch.Tensor] | None
                 ) -> tuple[dict[int, float], dict[int, np.ndarray]]:
        """Each head's loss over the whole split (as the single trainer scores validation) and argmax predictions."""
        c = self.config
        out_logits: dict[int, list[torch.Tensor]] = {h: [] for h in heads}
        out_va: dict[int, list[torch.Tensor]] = {h: [] for h in heads}
        n = {h: len(self.folds[self.states[h].fold].splits[split].utt_id) for h in heads}
        for first in range(0, max(n.values()), c.batch_size):
            part = [h for h in heads if first < n[h]]
            picks = [list(range(first, min(first + c.batch_size, n[h]))) for h in part]
            rows = self.rows(part, split, picks)
            logits, va = self.forward(self.weights(torch.tensor(part), source), rows, train=False)
            for i, (h, pick) in enumerate(zip(part, picks)):
                out_logits[h].append(logits[i, : len(pick)])
                out_va[h].append(va[i, : len(pick)])
        losses, preds = {}, {}
        for h in heads:
            fold = self.states[h].fold
            s = self.folds[fold].splits[split]
            logits, va = torch.cat(out_logits[h])[None], torch.cat(out_va[h])[None]
            loss = self.losses(logits, va, s.emotion[None], s.va[None], torch.tensor([fold], device=self.device))
            losses[h] = float(loss[0])
            preds[h] = logits[0].argmax(dim=1).cpu().numpy()
        return losses, preds

    # ---- the trained heads ----

    def head(self, h: int) -> SERHead:
        """Head h as an `SERHead`: its fold's fitted buffers and its kept (best epoch's) weights."""
        s = self.states[h]
        template = self.templates[s.fold]
        with torch.random.fork_rng(devices=[]):
            head = build_head(self.config, (template.mix.n_layers, template.input_size), len(template.classifier.bias))
        state = {k: v for k, v in template.state_dict().items()}
        weights = s.best if s.best is not None else {n: p[h].detach() for n, p in self.params.items()}
        state.update({n: v.detach().clone() for n, v in from_stack(weights).items()})
        head.load_state_dict(state)
        if head.mix.logits is not None:
            head.mix.fix(head.mix.logits.detach().clone())
        return head.to(self.device).eval()


QK, V = "mhsa.in_proj:qk.", "mhsa.in_proj:v."  # the pieces of nn.MultiheadAttention's in_proj_{weight,bias}
IN_PROJ = "mhsa.in_proj_"


def to_stack(params: dict[str, torch.Tensor], n_heads: int) -> dict[str, torch.Tensor]:
    """`SERHead` parameters stacked over heads `(H, ...)` in the layout the stack computes with.

    Each weight matrix input-major, `(H, in, out)`, so `x @ W` and its gradient `x^T @ dy` come out in the
    parameter's own layout (a transposed gradient costs a strided copy of every weight each step). The
    attention input projection in two pieces: queries and keys `(H, D, 2D)` and values by attention head
    `(H, nh, D, d)`, leaves of their own, since the chunked SAP uses them apart. Biases as they are.
    """
    out = {}
    for name, p in params.items():
        prefix, sep, kind = name.rpartition(IN_PROJ)
        dim = p.shape[-1] // 3 if kind == "bias" else p.shape[-1]
        if sep and kind == "weight":  # (H, 3D, D)
            out[prefix + QK + kind] = p[:, : 2 * dim].transpose(1, 2).contiguous()
            out[prefix + V + kind] = p[:, 2 * dim :].reshape(len(p), n_heads, -1, dim).transpose(2, 3).contiguous()
        elif sep:  # (H, 3D)
            out[prefix + QK + kind], out[prefix + V + kind] = p[:, : 2 * dim].clone(), p[:, 2 * dim :].clone()
        elif p.dim() == 3:  # a linear layer's (H, out, in)
            out[name] = p.transpose(1, 2).contiguous()
        else:
            out[name] = p.clone()
    return out


def from_stack(pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One head's weights (no head axis) by `SERHead`'s parameter names and layouts: `to_stack` undone."""
    out = {}
    for name, p in pieces.items():
        prefix, sep, kind = name.rpartition(QK)
        if sep:
            v = pieces[prefix + V + kind]
            if kind == "weight":  # (D, 2D) and (nh, D, d)
                out[prefix + IN_PROJ + kind] = torch.cat([p.t(), v.transpose(1, 2).reshape(-1, v.shape[1])])
            else:
                out[prefix + IN_PROJ + kind] = torch.cat([p, v])
        elif V not in name:
            out[name] = p.t() if p.dim() == 2 else p
    return out


def sample_frames(start: torch.Tensor, count: torch.Tensor, cap: int,
                  generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame ids of the kept frames, row after row, (n,); kept counts (A, B)): rows with more than `cap`
    frames keep `cap` of them in their order, drawn without replacement from head a's generator (training),
    or evenly spaced (`generators` None: validation, the same frames every epoch); other rows keep all."""
    a, b = count.shape
    kept = torch.clamp(count, max=cap)  # (A, B)
    if generators is None:
        steps = torch.arange(cap, device=count.device, dtype=torch.float64)  # (cap,)
        spacing = (count.double() / kept.clamp(min=1).double())[..., None]  # (A, B, 1) >= 1
        chosen = (steps * spacing).floor().long()  # (A, B, cap) strictly increasing within each row
    else:
        longest = int(count.max())
        keys = torch.stack([torch.rand(b, longest, generator=g) for g in generators]).to(count.device)  # (A, B, T)
        t = torch.arange(longest, device=count.device)
        keys = keys.masked_fill(t >= count[..., None], 2.0)  # frames past the row's end never win
        chosen = keys.argsort(dim=-1)[..., :cap].sort(dim=-1).values  # (A, B, cap) positions, in order
    valid = torch.arange(chosen.shape[-1], device=count.device) < kept[..., None]  # (A, B, cap)
    ids = (start[..., None] + chosen)[valid]  # row after row
    return ids, kept


def length_groups(count: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """`rows` (indices into `count`) in groups of similar length: sorted by count, a group grows while its
    padded attention cost (n x longest^2) stays within GROUP_WASTE of its rows' own (sum of count^2)."""
    if len(rows) == 0:
        return []
    order = rows[torch.argsort(count[rows], stable=True)]
    lengths = count[order].tolist()
    groups, first, real = [], 0, 0.0
    for i, n in enumerate(lengths):
        if i > first and (i - first + 1) * n * n > GROUP_WASTE * (real + n * n):
            groups.append(order[first:i])
            first, real = i, 0.0
        real += n * n
    groups.append(order[first:])
    return groups
