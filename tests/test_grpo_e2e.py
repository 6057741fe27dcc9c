"""GRPO end to end on CPU: real Megatron-Core policy, real vLLM engine, real math-verify.

A random tiny Qwen2 with the demo's character tokenizer answers "1" often enough by chance
(the reward falls back to the last number of a response) for groups to have reward variance,
so every step really updates the weights. Each step then checks, on the next step's rollouts,
that the engine's logprobs of the sampled tokens equal the trainer's (weight sync after real
updates), and that the first policy update of a step is on-policy (importance ratio 1).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import REPO, free_port
from tolerances import LOGPROB_ATOL

STEPS = 3


@pytest.fixture(scope="module")
def policy_and_prompts(tmp_path_factory):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.data import tiny_tokenizer as tt
    from megatron_ace.model.config import preset

    root = tmp_path_factory.mktemp("grpo")
    hf_dir = root / "policy"
    cfg = preset("tiny", vocab_size=tt.VOCAB_SIZE, eos_token_id=tt.IM_END_ID)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float()
    model.save_pretrained(hf_dir)
    tt.build_tiny_tokenizer(hf_dir)
    rows = [{"prompt": f"Compute {i}-{i - 1}.", "answer": "1"} for i in range(1, 41)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, hf_dir, prompts


def _run_grpo(root, hf_dir, prompts, out, tp: int):
    overrides = [
        f"model.hf_path={hf_dir}", f"data.tokenizer={hf_dir}", f"data.train_path={prompts}",
        f"data.heldout_path={prompts}", f"steps={STEPS}", f"parallel.tp={tp}",
        "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_response_tokens=12",
        "grpo.overlong_filter=false",
        "grpo.drop_zero_variance_groups=false", "grpo.micro_batch_size=8", "optim.lr=1e-3",
        "optim.min_lr=1e-3", "eval.max_problems=4", "eval.max_response_tokens=8",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]
    cli = ["-m", "megatron_ace.cli", "grpo", "--recipe", "grpo-tiny", "--out", str(out), *overrides]
    if tp == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
               f"--master-port={free_port()}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "reward/mean" in r]


@pytest.mark.vllm
@pytest.mark.numerics
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_grpo_sync_parity_and_on_policy_ratio(policy_and_prompts, tmp_path, tp):
    root, hf_dir, prompts = policy_and_prompts
    steps = _run_grpo(root, hf_dir, prompts, tmp_path / "run", tp)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for record in steps:
        # Engine logprobs of the sampled tokens == trainer logprobs of the same tokens, after
        # the previous steps' updates were synced into the running engine.
        assert record["mismatch/logp_abs_diff_max"] < LOGPROB_ATOL, record
        assert record["mismatch/num_tokens"] > 0
        # Strictly on-policy: the first (only) update of a step sees ratio 1.
        assert record["update/max_abs_ratio_minus_1_first"] < LOGPROB_ATOL, record
    assert any(r["update/grad_norm"] > 0 for r in steps), steps
    assert any(0 < r["reward/mean"] < 1 for r in steps), [r["reward/mean"] for r in steps]
    # The policy really changed, so later parity checks were made against updated weights.
    before = load_file(str(hf_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    changed = max((after[k] - before[k]).abs().max().item() for k in after)
    assert changed > 1e-4
