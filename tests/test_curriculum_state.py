"""Prompt stream with solved-prompt removal, plateau stop rule, and the resume fingerprint."""

import json

import pytest

from megatron_ace.train.curriculum_config import run_steps, until_plateau
from megatron_ace.train.curriculum_state import (
    PlateauTracker,
    PromptStream,
    file_digest,
    fingerprint_fields,
    fingerprint_mismatch,
)


def test_stream_visits_every_prompt_once_per_epoch():
    stream = PromptStream(10, seed=3, stage=0, drop_solved=False)
    first, second = stream.next_indices(10), stream.next_indices(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # reshuffled per epoch
    other_stage = PromptStream(10, seed=3, stage=1, drop_solved=False).next_indices(10)
    assert other_stage != first


def test_solved_prompts_leave_after_the_epoch_not_before():
    stream = PromptStream(6, seed=0, stage=2, drop_solved=True)
    epoch0 = stream.next_indices(4)
    stream.record(epoch0, [1.0, 0.5, 1.0, 0.0])  # two prompts fully solved
    rest = stream.next_indices(2)  # still epoch 0: nothing removed mid-epoch
    assert sorted(epoch0 + rest) == list(range(6))
    assert stream.removed == set() and stream.pending == {epoch0[0], epoch0[2]}
    stream.record(rest, [0.0, 0.0])
    epoch1 = stream.next_indices(4)
    assert stream.removed == {epoch0[0], epoch0[2]}
    assert sorted(epoch1) == sorted(set(range(6)) - stream.removed)
    assert stream.active_count == 4


def test_threshold_and_math_stages_keep_everything():
    keep = PromptStream(4, seed=0, stage=0, drop_solved=False)
    idx = keep.next_indices(4)
    keep.record(idx, [1.0] * 4)
    keep.next_indices(1)
    assert keep.removed == set()
    partial = PromptStream(4, seed=0, stage=0, drop_solved=True, solved_min_accuracy=0.5)
    idx = partial.next_indices(4)
    partial.record(idx, [0.5, 0.25, 1.0, 0.0])
    partial.next_indices(1)
    assert partial.removed == {idx[0], idx[2]}


def test_stream_state_round_trips_through_json_mid_epoch():
    a = PromptStream(7, seed=5, stage=4, drop_solved=True)
    for _ in range(3):
        idx = a.next_indices(3)
        a.record(idx, [1.0 if i % 2 else 0.0 for i in idx])
    state = json.loads(json.dumps(a.state_dict()))
    b = PromptStream(7, seed=5, stage=4, drop_solved=True)
    b.load_state_dict(state)
    for _ in range(5):
        ia, ib = a.next_indices(3), b.next_indices(3)
        assert ia == ib
        a.record(ia, [0.0] * len(ia))
        b.record(ib, [0.0] * len(ib))
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="num_items"):
        PromptStream(8, seed=5, stage=4, drop_solved=True).load_state_dict(state)


def test_all_prompts_solved_exhausts_the_stream():
    stream = PromptStream(3, seed=0, stage=0, drop_solved=True)
    idx = stream.next_indices(3)
    stream.record(idx, [1.0] * 3)
    assert stream.next_indices(3) == [] and stream.active_count == 0


def test_plateau_rule():
    assert PlateauTracker(run_steps(3)).stop_reason(2) == ""
    assert PlateauTracker(run_steps(3)).stop_reason(3) == "max_steps"
    t = PlateauTracker(until_plateau("r", patience=2, min_delta=0.05, max_steps=100, min_steps=3))
    reasons = []
    for step, value in enumerate([0.1, 0.3, 0.32, 0.34, 0.5, 0.5, 0.52, 0.53], start=1):
        t.observe({"r": value})
        reasons.append(t.stop_reason(step))
    # improvements > 0.05 at steps 1, 2, 5; two steps without one: stop at step 4 (>= min 3)
    assert reasons == ["", "", "", "plateau", "", "", "plateau", "plateau"]
    saved = json.loads(json.dumps(t.state_dict()))
    u = PlateauTracker(t.rule)
    u.load_state_dict(saved)
    assert u.state_dict() == t.state_dict()
    with pytest.raises(ValueError, match="plateau_metric"):
        t.observe({"other": 1.0})


def test_plateau_min_steps_and_window():
    t = PlateauTracker(until_plateau("r", patience=1, min_delta=0.0, max_steps=10, window=2,
                                     min_steps=4))
    out = []
    for step, v in enumerate([1.0, 0.0, 0.0, 0.0, 0.0], start=1):
        t.observe({"r": v})
        out.append(t.stop_reason(step))
    assert out == ["", "", "", "plateau", "plateau"]


def test_fingerprint_names_the_differing_fields(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    cfg = {"base": {"seed": 1, "logging": {"progress_bar": True}, "model": {"hf_path": "x"}},
           "stages": [{"name": "a", "group_size": 8}]}
    fp = fingerprint_fields(cfg, {"model": str(weights)})
    assert "base.logging.progress_bar" not in fp  # harmless fields may change
    same = fingerprint_fields({**cfg, "base": {**cfg["base"], "logging": {"progress_bar": False}}},
                              {"model": str(weights)})
    assert fingerprint_mismatch(fp, same) == []
    cfg2 = {**cfg, "stages": [{"name": "a", "group_size": 16}]}
    weights.write_bytes(b"abd")
    diffs = fingerprint_mismatch(fp, fingerprint_fields(cfg2, {"model": str(weights)}))
    assert len(diffs) == 2
    assert diffs[0].startswith("file:model") and diffs[1].startswith("stages[0].group_size")


def test_file_digest_partial_for_big_files(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(65 << 20)
    before = file_digest(big)
    with open(big, "r+b") as f:
        f.seek(64 << 20)  # only the last MiB of a large file is hashed besides the first
        f.write(b"x")
    assert file_digest(big) != before
