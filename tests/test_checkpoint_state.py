"""Training-state checkpoints (train/state.py) in one process: exact round trip for every
optimizer backend, asynchronous saves, pruning, and bad checkpoints refused by name with nothing
overwritten; and a run SIGKILLed in the middle of a save resumes from the previous checkpoint.

Exactness tests compare bit for bit: the same process and kernels compute both sides.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import REPO, free_port

BACKENDS = {"torch": dict(backend="torch"), "mcore": dict(backend="mcore", distributed=False),
            "mcore-distributed": dict(backend="mcore", distributed=True)}


@pytest.fixture
def ps(monkeypatch):
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    yield init_parallel(ParallelConfig(), seed=3)
    destroy_parallel()


def _trainer(ps, name: str = "tiny", backend: str = "torch"):
    from megatron_ace.model.config import preset
    from megatron_ace.train.config import OptimBackend, OptimConfig
    from megatron_ace.train.sft import build_trainer

    kwargs = dict(BACKENDS[backend])
    kwargs["backend"] = OptimBackend(kwargs["backend"])
    optim = OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.01, clip_grad=1.0, **kwargs)
    return build_trainer(preset(name), ps, optim, total_steps=10, dtype=torch.float32)


def _train(trainer, ps, steps) -> list[float]:
    from test_sft_parallel import global_batch

    from megatron_ace.train.step import train_step

    return [train_step(trainer.opt, trainer.sched, global_batch(i, 1000), ps).loss for i in steps]


def _save(trainer, ps, root: Path, step: int, **kwargs) -> Path:
    from megatron_ace.train.state import save_training_state

    return save_training_state(root, step=step, model_chunks=trainer.opt.model_chunks,
                               opt=trainer.opt, sched=trainer.sched, ps=ps,
                               data_state={"consumed": step}, keep_last=kwargs.pop("keep_last", 5),
                               extra={"note": "x"}, **kwargs)


def _load(trainer, ps, path: Path):
    from megatron_ace.train.state import load_training_state

    return load_training_state(path, model_chunks=trainer.opt.model_chunks, opt=trainer.opt,
                               sched=trainer.sched, ps=ps, seed=3)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
            if not k.endswith("_extra_state")}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_round_trip_continues_bit_identically(ps, tmp_path, backend):
    trainer = _trainer(ps, backend=backend)
    _train(trainer, ps, range(2))
    path = _save(trainer, ps, tmp_path / "ckpt", 2)
    draws = torch.rand(4)
    want = _train(trainer, ps, range(2, 4))
    fresh = _trainer(ps, backend=backend)  # other initial weights, optimizer never stepped
    info = _load(fresh, ps, path)
    assert (info.step, info.data_state, info.extra, info.layout_changed) == (
        2, {"consumed": 2}, {"note": "x"}, False)
    assert torch.equal(torch.rand(4), draws)  # RNG states restored
    assert fresh.sched.num_steps == 2
    assert _train(fresh, ps, range(2, 4)) == want
    inner = getattr(fresh.opt.optimizer, "chained_optimizers", [fresh.opt.optimizer])
    for opt in inner:  # every parameter owns its Adam step (no shared tensor after a load)
        torch_opt = getattr(opt, "optimizer", opt)
        steps = [s["step"] for s in torch_opt.state.values() if "step" in s]
        assert len({id(s) for s in steps}) == len(steps) > 0


def test_async_save_writes_the_state_of_its_step(ps, tmp_path):
    from megatron_ace.train.state import finish_saves, read_meta

    trainer = _trainer(ps)
    _train(trainer, ps, range(2))
    sync = _save(trainer, ps, tmp_path / "sync", 2)
    pending = _save(trainer, ps, tmp_path / "async", 2, async_save=True)
    assert not pending.exists()  # committed only when finished
    _train(trainer, ps, range(2, 3))  # the weights change while the writer runs
    finish_saves()
    assert read_meta(pending) == read_meta(sync)
    files = sorted(p.name for p in sync.iterdir())
    assert files == sorted(p.name for p in pending.iterdir())
    for name in files:
        if name.endswith(".distcp"):
            assert (sync / name).read_bytes() == (pending / name).read_bytes(), name
    assert not list((tmp_path / "async").glob(".tmp-*"))


def test_keep_last_prunes_and_leftovers_are_cleared(ps, tmp_path):
    from megatron_ace.train.state import list_checkpoints

    trainer = _trainer(ps)
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        _save(trainer, ps, root, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    (root / ".tmp-step_00000009").mkdir()  # what a killed save leaves
    (root / "step_00000003.old-77").mkdir()  # what a killed re-save of a step leaves
    _save(trainer, ps, root, 4, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


def test_bad_checkpoints_are_refused_by_name_and_change_nothing(ps, tmp_path):
    from megatron_ace.train.state import UnreadableCheckpoint, list_checkpoints

    trainer = _trainer(ps)
    _train(trainer, ps, range(1))
    good = _save(trainer, ps, tmp_path / "ckpt", 1)
    other = _trainer(ps, "tiny-4l")
    before = _weights(other)
    with pytest.raises(ValueError, match=r"another model shape \(intermediate_size: checkpoint "
                                         r"256, this model 352; num_hidden_layers: checkpoint 2"):
        _load(other, ps, good)
    mcore = _trainer(ps, backend="mcore")
    with pytest.raises(ValueError, match="saved by TorchAdamW, this run uses McoreOptimizer"):
        _load(mcore, ps, good)

    partial = tmp_path / "ckpt" / "step_00000005"  # no meta.json: never listed, not loadable
    shutil.copytree(good, partial)
    (partial / "meta.json").unlink()
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [1]
    with pytest.raises(UnreadableCheckpoint, match="meta.json is missing"):
        _load(trainer, ps, partial)
    shard = next(good.glob("*.distcp"))
    fresh = _trainer(ps)
    before_fresh = _weights(fresh)
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(UnreadableCheckpoint, match=rf"{shard.name} is truncated \(5000 of"):
        _load(fresh, ps, good)
    shard.unlink()
    with pytest.raises(UnreadableCheckpoint, match=rf"{shard.name} is missing"):
        _load(fresh, ps, good)
    for model, weights in ((other, before), (fresh, before_fresh)):
        after = _weights(model)
        assert all(torch.equal(after[k], weights[k]) for k in weights)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """The process dies after writing every shard of step 4 but before committing it."""
    from megatron_ace.train.state import list_checkpoints

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ACE_CACHE_DIR=str(tmp_path / "cache"))
    args = ["sft", "--recipe", "sft-tiny", "--out", str(out), "schedule.max_steps=4",
            "checkpoint.save_interval=2", "arith.num_samples=300", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.export_hf=false"]
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "kill_during_save.py"),
                             "4", *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert list((ckpts / ".tmp-step_00000004").glob("*.distcp"))  # the shards were written
    again = subprocess.run([sys.executable, "-m", "megatron_ace.cli", *args], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step_00000002" in again.stderr
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]


def test_training_starts_from_a_converted_checkpoint(ps, tmp_path):
    """`model.mcore_path` (a torch_dist model from the converter, here chunked for TP2) gives the
    same weights as starting from the HF directory it was converted from."""
    from test_convert_roundtrip import make_hf

    from megatron_ace.checkpoint.convert import hf_to_mcore
    from megatron_ace.model.config import preset
    from megatron_ace.train.config import ModelSection, OptimConfig
    from megatron_ace.train.sft import build_trainer

    hf = make_hf(tmp_path / "hf", "tiny")
    converted = hf_to_mcore(hf, tmp_path / "m", tp=2, pp=2)
    section = ModelSection(mcore_path=str(converted))
    assert section.resolve() == ModelSection(hf_path=str(hf)).resolve()
    kw = dict(total_steps=1, dtype=torch.float32)
    from_hf = build_trainer(preset("tiny"), ps, OptimConfig(), hf_path=str(hf), **kw)
    from_mcore = build_trainer(section.resolve(), ps, OptimConfig(), mcore_path=str(converted), **kw)
    want, got = _weights(from_hf), _weights(from_mcore)
    assert set(want) == set(got) and all(torch.equal(got[k], want[k]) for k in want)


def test_previous_format_is_still_read_at_its_layout(ps, tmp_path, caplog):
    """A checkpoint of the previous release (per-rank torch.save files, format_version 1),
    written here from that format's description, resumes exactly; the next save is torch_dist."""
    import json
    import random

    import numpy as np

    from megatron_ace.train.state import read_meta

    trainer = _trainer(ps)
    _train(trainer, ps, range(2))
    old = tmp_path / "ckpt" / "step_00000002"
    old.mkdir(parents=True)
    torch.save([trainer.model.state_dict()], old / "model_tp00_pp00.pt")
    torch.save({"optimizer": trainer.opt.state_dict(), "schedule": trainer.sched.state_dict()},
               old / "optim_tp00_pp00_dp000.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, old / "rng_rank00000.pt")
    (old / "meta.json").write_text(json.dumps({
        "format_version": 1, "step": 2, "data_state": {"consumed": 2},
        "layout": {"tp": 1, "pp": 1, "dp": 1}, "shards_optimizer_over_dp": False, "extra": {}}))
    want = _train(trainer, ps, range(2, 4))
    fresh = _trainer(ps)
    with caplog.at_level("WARNING"):
        assert _load(fresh, ps, old).step == 2
    assert "previous checkpoint format" in caplog.text
    assert _train(fresh, ps, range(2, 4)) == want
    assert read_meta(_save(fresh, ps, tmp_path / "ckpt", 4))["format"] == "torch_dist"
