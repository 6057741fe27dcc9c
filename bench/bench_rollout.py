"""Rollout throughput: `RolloutEngine.generate` vs vLLM's `LLM.generate` called directly.

Both paths run on the same engine instance with the same prompts and the same `SamplingParams`
(per-prompt seeds, sampled-token logprobs), so the difference is what `RolloutEngine` adds:
building the requests and turning outputs into `Sample` records. Runs alternate (direct,
wrapped, direct, ...); the best and the median of each are reported (on a shared machine the
best is the less noisy), plus the conversion cost alone, timed on the same outputs.
Optionally (`--sync`) also times a weight sync of the same model over each CPU transport.

    python bench/bench_rollout.py --out bench_rollout.json [--model DIR] [--sync]

Without `--model` a random Qwen2 (float32) with the tiny character tokenizer is built in a
temporary directory. Prints one JSON object and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_random_model(out_dir: Path, *, hidden: int, layers: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_ace.data.tiny_tokenizer import IM_END_ID, PAD_ID, VOCAB_SIZE, build_tiny_tokenizer

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        head_dim=64, max_position_embeddings=1024, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(out_dir)
    build_tiny_tokenizer(out_dir)
    return out_dir


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_generate(engine, args) -> dict:
    from megatron_ace.rollout.types import SamplingConfig

    # Fixed-length responses (EOS ignored) so both paths produce the same number of tokens.
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0, stop_on_eos=False)
    prompts = [[4 + (7 * i + j) % 90 for j in range(args.prompt_len)] for i in range(args.num_prompts)]
    params = [engine.sampling_params(sampling, i) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]

    def direct():
        outs = engine.llm.generate(requests, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def wrapped():
        groups = engine.generate(prompts, sampling)
        return sum(s.num_response_tokens for g in groups for s in g)

    direct(), wrapped()  # warm-up (first requests are slower)
    times: dict[str, list[float]] = {"direct": [], "rollout_engine": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in (("direct", direct), ("rollout_engine", wrapped)):
            seconds, count = _timed(fn)
            times[name].append(seconds)
            tokens[name] = count
    assert tokens["direct"] == tokens["rollout_engine"], tokens
    # What the wrapper adds on its own, free of the machine's noise: converting the very same
    # vLLM outputs into Sample records, timed against generating them.
    gen_s, outs = _timed(lambda: engine.llm.generate(requests, params, use_tqdm=False))
    conv_s, _ = _timed(lambda: engine.to_samples(outs, sampling))
    best = {k: tokens[k] / min(v) for k, v in times.items()}
    median = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    return {
        "num_prompts": args.num_prompts, "n": args.n, "max_tokens": args.max_tokens,
        "tokens_per_run": tokens["direct"], "repeats": args.repeats,
        "seconds": times,
        "tokens_per_s_best": best,
        "tokens_per_s_median": median,
        "ratio_best": best["rollout_engine"] / best["direct"],
        "ratio_median": median["rollout_engine"] / median["direct"],
        "conversion_s": conv_s,
        "conversion_overhead_pct": 100.0 * conv_s / gen_s,
    }


def bench_sync(engine, model_dir: Path, bucket_bytes: int) -> dict:
    from safetensors.torch import load_file

    from megatron_ace.rollout.transport import TransportKind
    from megatron_ace.rollout.weight_sync import WeightSyncConfig, WeightSyncer

    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(path))
    out = {}
    for kind in (TransportKind.BYTES, TransportKind.SHARED_MEMORY):
        syncer = WeightSyncer(engine, WeightSyncConfig(bucket_bytes=bucket_bytes, transport=kind))
        out[kind.value] = syncer.sync(iter(state.items())).to_dict(prefix="")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: build a random one)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sync", action="store_true", help="also time weight sync per transport")
    parser.add_argument("--bucket-bytes", type=int, default=1 << 20)
    parser.add_argument("--out", type=Path, default=Path("bench_rollout.json"))
    args = parser.parse_args(argv)

    from megatron_ace.rollout.engine import RolloutEngineConfig, VllmRolloutEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_random_model(Path(tmp), hidden=args.hidden, layers=args.layers)
        seconds, engine = _timed(lambda: VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir))))
        try:
            result = {"engine_start_s": seconds, "model": str(args.model or "random"),
                      "generate": bench_generate(engine, args)}
            if args.sync:
                result["weight_sync"] = bench_sync(engine, Path(model_dir), args.bucket_bytes)
        finally:
            engine.close()
    text = json.dumps(result, indent=2)
    args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":  # spawned vLLM workers re-import this file
    sys.exit(main(sys.argv[1:]))
