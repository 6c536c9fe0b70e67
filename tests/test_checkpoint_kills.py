"""A fine-tuning checkpoint survives a kill at any moment of its save: the next load gets the
previous checkpoint or the new one, whole, and never asks the user to delete anything."""

from __future__ import annotations

import shutil

import pytest
import torch

from heads.finetune.checkpoint import Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from kill_points import KillAt, Killed


def ckpt(epoch: int, best_epoch: int | None) -> Checkpoint:
    g = torch.Generator().manual_seed(epoch)
    model = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    best = None
    if best_epoch is not None:
        gb = torch.Generator().manual_seed(best_epoch)
        best = {"w": torch.randn(64, 32, generator=gb), "b": torch.randn(32, generator=gb)}
    return Checkpoint(epoch=epoch, model=model, best=best, best_epoch=best_epoch,
                      state={"optimizer": {"step": torch.tensor(epoch)}, "history": [epoch]})


def same(a: Checkpoint, b: Checkpoint) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and x.keys() == y.keys()
                                             and all(torch.equal(x[k], y[k]) for k in x))
    return a.epoch == b.epoch and a.best_epoch == b.best_epoch and eq(a.model, b.model) and eq(a.best, b.best) \
        and a.state["history"] == b.state["history"]


def ops_in(fn) -> int:
    with pytest.MonkeyPatch.context() as mp:
        counter = KillAt(None).install(mp)
        fn()
    return counter.calls


@pytest.mark.parametrize("new_best", [1, 2], ids=["best-unchanged-linked", "best-new-written"])
def test_a_kill_at_every_step_of_a_save_leaves_a_whole_checkpoint(tmp_path, new_best):
    base = tmp_path / "base"
    first, second = ckpt(1, 1), ckpt(2, new_best)
    save_checkpoint(base, first)
    n_ops = ops_in(lambda: save_checkpoint(tmp_path / "count", first) and save_checkpoint(tmp_path / "count", second))
    assert n_ops > 10
    outcomes = set()
    for n in range(n_ops + 1):
        folder = tmp_path / f"k{n}"
        shutil.copytree(base, folder)
        with pytest.MonkeyPatch.context() as mp:
            KillAt(n).install(mp)
            try:
                save_checkpoint(folder, second)
            except Killed:
                pass
        assert has_checkpoint(folder), n
        loaded = load_checkpoint(folder)  # never "delete the checkpoint folder"
        assert same(loaded, second) or same(loaded, first), n
        outcomes.add(loaded.epoch)
        # the load tidied up: one epoch folder, nothing half-written
        assert [p.name for p in folder.iterdir()] == [f"epoch-{loaded.epoch:04d}"], (n, list(folder.iterdir()))
        save_checkpoint(folder, ckpt(3, 3))  # and training goes on from there
        assert load_checkpoint(folder).epoch == 3
    assert outcomes == {1, 2}  # kills before and after the commit point were both tried


def test_a_kill_during_the_first_save_leaves_no_checkpoint_or_a_whole_one(tmp_path):
    n_ops = ops_in(lambda: save_checkpoint(tmp_path / "count", ckpt(1, 1)))
    for n in range(n_ops + 1):
        folder = tmp_path / f"k{n}"
        with pytest.MonkeyPatch.context() as mp:
            KillAt(n).install(mp)
            try:
                save_checkpoint(folder, ckpt(1, 1))
            except Killed:
                pass
        if has_checkpoint(folder):
            assert same(load_checkpoint(folder), ckpt(1, 1)), n


def test_an_unchanged_best_is_linked_not_rewritten(tmp_path):
    save_checkpoint(tmp_path, ckpt(1, 1))
    inode = (tmp_path / "epoch-0001" / "best.safetensors").stat().st_ino
    save_checkpoint(tmp_path, ckpt(2, 1))
    assert (tmp_path / "epoch-0002" / "best.safetensors").stat().st_ino == inode
    save_checkpoint(tmp_path, ckpt(3, 3))
    assert (tmp_path / "epoch-0003" / "best.safetensors").stat().st_ino != inode
    assert same(load_checkpoint(tmp_path), ckpt(3, 3))


def test_the_flat_layout_of_earlier_versions_still_loads(tmp_path):
    from safetensors.torch import save_file

    c = ckpt(4, 2)
    save_file(c.model, str(tmp_path / "model.safetensors"), metadata={"epoch": "4"})
    save_file(c.best, str(tmp_path / "best.safetensors"), metadata={"epoch": "4"})
    torch.save({**c.state, "epoch": 4, "has_best": True}, tmp_path / "state.pt")
    loaded = load_checkpoint(tmp_path)
    assert loaded.epoch == 4 and torch.equal(loaded.model["w"], c.model["w"]) and torch.equal(loaded.best["w"], c.best["w"])
    save_checkpoint(tmp_path, ckpt(5, 5))  # the next save moves to the new layout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0005"]
