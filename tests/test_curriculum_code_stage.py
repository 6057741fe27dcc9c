"""A curriculum whose code stage scores with the real sandboxed code reward.

The stage switches prompt file and reward pool (bubblewrap sandbox) and back; the held-out
evaluation after the code stage still uses the math reward of the base prompts. The code rows
have no math answer, so scoring them with the wrong reward, or the math held-out set with the
code reward, fails the run.
"""

import json
import subprocess

import pytest
from test_grpo_resume import ENV, REPO, _command, tiny_policy  # noqa: F401 (fixture)

from megatron_ace.train.metrics import read_metrics


@pytest.mark.vllm
def test_code_stage_uses_the_code_reward(tiny_policy, tmp_path):  # noqa: F811
    _, (hf_dir, _), prompts = tiny_policy
    rows = [{"prompt": f"Write a Python program that prints {a}+{b}.",
             "input_output": json.dumps({"inputs": [""], "outputs": [str(a + b)]})}
            for a in range(1, 5) for b in range(1, 3)]
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = _command(hf_dir, prompts, out, [
        "stage.code.domain=code", f"stage.code.train_path={code}",
        "stage.math-short.stop.max_steps=1", "stage.math-long.stop.max_steps=1",
        "stage.code.stop.max_steps=2", "stage.math-final.stop.max_steps=1",
        "stage.math-final.stop.min_steps=1"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [records[s]["stage_name"] for s in sorted(records)] == [
        "math-short", "math-long", "code", "code", "math-final"]
    code_steps = [r for r in records.values() if r["stage_name"] == "code"]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in code_steps)
    assert "eval/accuracy" in code_steps[-1]  # math held-out set, math reward
    assert "code: 2 steps" in proc.stderr
