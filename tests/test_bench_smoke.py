"""Smoke runs of the benchmark scripts at tiny sizes, and checks of the measuring code itself.

The figures are not checked (they depend on the machine); what is checked is that each script
runs end to end, writes consistent JSON, and that the probes they rely on (peak-RSS reset, the
plain-torch Qwen2 reference of gpu_check, the phase breakdown) really measure what they claim.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import REPO
from tolerances import LOGPROB_ATOL

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))


def _run(script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ---- bench_grpo_iteration ---------------------------------------------------------------------
def _rows(phase_ms: list[dict[str, float]]) -> list[dict]:
    rows = [{"step": 0, "time": 100.0, "eval/accuracy": 0.5}]  # an eval row without phases
    t = 100.0
    for i, ms in enumerate(phase_ms, start=1):
        t += sum(ms.values()) / 1000 + 0.005
        rows.append({"step": i, "time": t, **{f"time/{k}": v / 1000 for k, v in ms.items()}})
    return rows


def test_grpo_phase_breakdown_invariants(tmp_path):
    from bench_grpo_iteration import PHASES, phase_breakdown

    gen = torch.Generator().manual_seed(0)
    steps = [{p: float(torch.randint(5, 300, (1,), generator=gen)) for p in PHASES}
             for _ in range(7)]
    steps[0]["update"] = 10_000.0  # a slow first step must not count
    result = phase_breakdown(_rows(steps))
    assert result["num_steps"] == 6
    assert sum(result["share"].values()) == pytest.approx(1.0)
    medians = {}
    for p in PHASES:
        values = sorted(s[p] for s in steps[1:])
        medians[p] = (values[2] + values[3]) / 2
        assert result["ms"][p] == pytest.approx(medians[p])
    assert result["slowest_phase"] == max(medians, key=medians.get)
    assert result["unaccounted_ms"] == pytest.approx(5.0, abs=1e-6)
    with pytest.raises(ValueError, match="time/sync"):
        phase_breakdown([{"step": 1, "time/generate": 1.0}])


def test_grpo_iteration_cli_on_existing_metrics(tmp_path):
    from bench_grpo_iteration import PHASES

    metrics = tmp_path / "metrics.jsonl"
    steps = [{p: (100.0 if p == "generate" else 10.0 * (i + 1)) + j for i, p in enumerate(PHASES)}
             for j in range(3)]
    metrics.write_text("\n".join(json.dumps(r) for r in _rows(steps)) + "\n")
    proc = _run("bench_grpo_iteration.py", "--metrics", metrics, "--out", tmp_path / "g.json")
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["slowest_phase"] == "generate" and "slowest phase: generate" in proc.stdout


# ---- bench_weight_sync -------------------------------------------------------------------------
def test_peak_rss_reset_sees_a_transient_allocation():
    from bench_weight_sync import _status_kib, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("kernel refuses /proc/self/clear_refs")
    before = _status_kib("VmRSS")
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    del block
    grown = _status_kib("VmHWM") - before
    assert grown >= 60 * 1024
    reset_peak_rss()
    assert _status_kib("VmHWM") - _status_kib("VmRSS") < 16 * 1024  # the reset really reset


@pytest.mark.vllm
@pytest.mark.slow
def test_weight_sync_bench_tiny_tp1(tmp_path):
    out = tmp_path / "ws.json"
    _run("bench_weight_sync.py", "--preset", "tiny", "--tp", "1", "--repeats", "1",
         "--transport", "bytes", "shared_memory", "--bucket-mb", "0.25", "8", "--out", out)
    case = json.loads(out.read_text())["cases"][0]
    from megatron_ace.model.config import preset
    from megatron_ace.model.mapping import hf_shapes

    assert case["num_bytes"] == preset("tiny").num_params() * 4
    small, large, shared_small, shared_large = case["syncs"]
    assert small["num_buckets"] > 1 and large["num_buckets"] == 1
    assert small["peak_bucket_bytes"] <= 0.25 * 2**20 or small["num_buckets"] > 4
    assert small["num_shared_bytes"] == 0
    # Shared parameters: everything but q/k/v (copied by the gather) is read where it lies,
    # for both bucket sizes (one parameter file serves them).
    for row in (shared_small, shared_large):
        assert row["transport"] == "shared_memory"
        assert 0.5 * case["num_bytes"] < row["num_shared_bytes"] < case["num_bytes"]
    for row in case["syncs"]:
        assert row["gb_per_s"] == pytest.approx(case["num_bytes"] / 1e9 / row["sync_s"])
        (sync,), (floor,) = row["sync_runs_s"], row["floor_runs_s"]  # one round each
        assert row["sync_over_floor"] == pytest.approx(sync / floor)
        (sync_cpu,), (floor_cpu,) = row["sync_cpu_runs_s"], row["floor_cpu_runs_s"]
        assert sync_cpu > 0 and floor_cpu > 0  # the engine's process is a child: counted
    # One floor per timed sync; it reloaded every tensor the engine loads (the tiny model's
    # head is not tied).
    assert case["engine_reload_floor_s"] > 0 and len(case["engine_reload_floor_runs_s"]) == 4
    assert case["floor_num_tensors"] == len(hf_shapes(preset("tiny")))


# ---- gpu_check ---------------------------------------------------------------------------------
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("gpu_check.py", "--cpu-smoke", "--out", out)
    report = json.loads(out.read_text())
    assert report["parity"]["ok"], report["parity"]
    assert set(report["mfu"]["models"]) >= {"torch_sdpa", "mcore_local", "mcore_sdpa"}
    assert report["mfu"]["models"]["torch_sdpa"]["over_torch_sdpa"] == pytest.approx(1.0)
    from megatron_ace.model.config import preset

    assert report["reshard"]["num_bytes"] >= preset("tiny").num_params() * 2  # bf16, padded
    runs = report["grpo"]["runs"]
    assert runs["packed"]["real_token_share"] > runs["padded"]["real_token_share"]
    assert runs["packed"]["real_positions"] == runs["padded"]["real_positions"]
    assert "FAILED" not in proc.stdout


# ---- bench_grpo_update -------------------------------------------------------------------------
def test_grpo_update_bench_small(tmp_path):
    out = tmp_path / "u.json"
    _run("bench_grpo_update.py", "--prompts", "2", "--group", "4", "--median", "24", "--cap",
         "64", "--max-tokens", "256", "--micro-batch-size", "2", "--threads", "1", "--out", out)
    report = json.loads(out.read_text())
    packed, padded = report["runs"]["packed"], report["runs"]["padded"]
    assert packed["real_positions"] == padded["real_positions"] > 0
    assert packed["real_token_share"] >= 0.9 and packed["real_token_share"] > padded["real_token_share"]
    # Same rollouts, same weights, float32: the two layouts computed the same loss.
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4, abs=1e-7)
    assert report["speedup"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"])


def test_thd_attention_bench_small(tmp_path):
    out = tmp_path / "a.json"
    _run("bench_thd_attention.py", "--budget", "600", "--median", "40", "--cap", "200",
         "--repeats", "1", "--threads", "1", "--out", out)
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert set(cases) == {"packed_per_sequence", "packed_length_buckets", "padded_masked"}
    assert report["num_sequences"] >= 2 and sum(report["lengths"]) <= 600
    # The three compute the same attention for every real position (checked against the
    # per-sequence path, the one the SDPA core attention runs for THD rows).
    assert all(c["max_abs_diff"] < 1e-4 for c in cases.values()), cases
    assert cases["packed_per_sequence"]["ratio_to_per_sequence"] == 1.0
    assert cases["padded_masked"]["positions"] >= cases["packed_per_sequence"]["positions"]


@pytest.fixture
def single_rank():
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    ps = init_parallel(ParallelConfig(), seed=0)
    yield ps
    destroy_parallel()


@pytest.mark.numerics
def test_gpu_check_reference_catches_a_wrong_mapping(single_rank):
    """The plain-torch reference must disagree loudly with a model whose weights are wrong
    (gate and up swapped), or the parity section could not fail."""
    import torch.nn.functional as F
    from gpu_check import PARITY_CFG, RefQwen2, build_mcore, mcore_logits, random_hf_state

    from megatron_ace.model.weights import load_hf_into_model

    cfg = PARITY_CFG
    state = random_hf_state(cfg, "cpu", torch.float32)
    swapped = dict(state)
    for i in range(cfg.num_layers):
        g, u = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
        swapped[g], swapped[u] = state[u], state[g]
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    model = build_mcore(cfg, single_rank, torch.float32, "sdpa")
    load_hf_into_model(model, swapped.__getitem__, cfg, single_rank)
    model.eval()
    with torch.no_grad():
        ref = F.log_softmax(RefQwen2(cfg, state)(tokens), -1)
        good = F.log_softmax(RefQwen2(cfg, swapped)(tokens), -1)
        logp = F.log_softmax(mcore_logits(model, tokens)[..., : cfg.vocab_size], -1)
    assert (logp - good).abs().max() < LOGPROB_ATOL  # same (wrong) weights: agree
    assert (logp - ref).abs().max() > 1e-2  # wrong weights vs the right reference: caught
