"""Engine side of weight sync: methods mixed into every vLLM worker (`worker_extension_cls`).

The driver reaches these with `LLM.collective_rpc("ace_...")`. One update is three kinds of
call, mirroring vLLM's own weight-transfer engines (`vllm/distributed/weight_transfer`):

1. `ace_begin_weight_update(version)`: refuse a stale/duplicate version; otherwise put every
   layer into vLLM's *layerwise reload* mode (its kernel-format tensors are set aside and its
   weight loaders buffer incoming checkpoint-format tensors). Checkpoint format is required
   because the CPU backend repacks linear weights after loading (`model.load_weights` straight
   into the live model leaves `.weight` empty there); layerwise reload re-runs that processing.
2. `ace_load_weight_bucket(descriptor)`: unpack one bucket through the transport, check every
   name and shape against the checkpoint's manifest, feed it to `model.load_weights`. A layer is
   processed and copied into its original storage as soon as all its tensors have arrived, so
   buckets may split a layer anywhere; the reply says whether the reload still holds tensors of
   the bucket (the sender may reuse the bucket's memory only when it does not).
3. `ace_finish_weight_update(version)`: check that every checkpoint tensor arrived exactly once,
   finalise (attention layers are processed last), check that no tensor of the trainer's
   shared parameters is still referenced, record the version.

Any exception after step 1 leaves layers on the meta device: the worker marks itself broken and
refuses further updates; the driver treats it as fatal. This module does not decide bucket
sizes, retry, or roll back.

This file is imported inside vLLM worker processes: it must not import the rest of megatron_ace
beyond the transports (`rollout.transport`, `rollout.shm_transport`, which log through
`utils.logging`).
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch

from megatron_ace.rollout.transport import BucketReceiver, descriptor_kind, make_receiver

_TIED_HEAD = "lm_head.weight"


def read_checkpoint_manifest(model_dir: str) -> dict[str, tuple[int, ...]] | None:
    """HF tensor name -> shape from the safetensors headers in `model_dir` (no tensor data is
    read); None when the directory holds no safetensors (e.g. an engine started with dummy
    weights), in which case only vLLM's own checks apply."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    manifest: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                manifest[name] = tuple(f.get_slice(name).get_shape())
    return manifest


class AceWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (has `model_runner`, `vllm_config`,
    `rank`). State lives in `_ace_*` attributes created on first use (a mixin has no __init__)."""

    # ---- state -----------------------------------------------------------------------------

    def _ace_state(self) -> dict[str, Any]:
        state = getattr(self, "_ace", None)
        if state is None:
            state = {"version": 0, "active": None, "broken": None, "received": set(),
                     "receivers": {}, "manifest": None, "manifest_read": False}
            self._ace = state
        return state

    def _ace_manifest(self) -> dict[str, tuple[int, ...]] | None:
        state = self._ace_state()
        if not state["manifest_read"]:
            state["manifest"] = read_checkpoint_manifest(self.vllm_config.model_config.model)
            state["manifest_read"] = True
        return state["manifest"]

    def _ace_receiver(self, descriptor: dict[str, Any]) -> BucketReceiver:
        kind = descriptor_kind(descriptor)
        receivers = self._ace_state()["receivers"]
        if kind not in receivers:
            receivers[kind] = make_receiver(kind)
        return receivers[kind]

    def _ace_fail(self, where: str, exc: BaseException) -> None:
        self._ace_state()["broken"] = f"{where}: {type(exc).__name__}: {exc}"

    def _ace_check_usable(self) -> None:
        broken = self._ace_state()["broken"]
        if broken:
            raise RuntimeError(f"weights are in an undefined state after a failed update ({broken})")

    # ---- RPC methods -----------------------------------------------------------------------

    def ace_weight_version(self) -> int:
        return int(self._ace_state()["version"])

    def ace_is_broken(self) -> str | None:
        return self._ace_state()["broken"]

    def ace_packed_modules(self) -> dict[str, list[str]]:
        """Checkpoint names loaded into one fused module ({"qkv_proj": ["q_proj", ...]})."""
        packed = getattr(self.model_runner.get_model(), "packed_modules_mapping", None) or {}
        return {str(k): [str(p) for p in v] for k, v in dict(packed).items()}

    def ace_init_transport(self, kind: str, init_info: dict[str, Any]) -> None:
        """Connect this worker's receiver of `kind` (NCCL joins the sender's group)."""
        receivers = self._ace_state()["receivers"]
        receiver = receivers.setdefault(descriptor_kind({"kind": kind}), make_receiver(kind))
        receiver.connect(init_info, worker_rank=int(self.rank))

    def ace_begin_weight_update(self, version: int) -> dict[str, Any]:
        """Start update `version`; returns {"accepted": bool, "current_version": int}."""
        state = self._ace_state()
        self._ace_check_usable()
        if state["active"] is not None:
            raise RuntimeError(f"weight update {state['active']} is still open")
        if version <= state["version"]:
            # Refused before anything is touched: the engine keeps serving its current weights.
            return {"accepted": False, "current_version": state["version"]}
        self._ace_manifest()  # read the headers now, not halfway through the stream
        try:
            self._ace_reload_begin()
        except BaseException as exc:
            self._ace_fail("begin", exc)
            raise
        state["active"] = version
        state["received"] = set()
        return {"accepted": True, "current_version": state["version"]}

    def ace_load_weight_bucket(self, descriptor: dict[str, Any]) -> dict[str, Any]:
        """Load one bucket; returns {"num_tensors": int, "retained": bool}, where `retained`
        says the reload still references the bucket's memory (a layer whose other tensors are
        yet to come), so the sender must not reuse it."""
        state = self._ace_state()
        self._ace_check_usable()
        if state["active"] is None:
            raise RuntimeError("ace_load_weight_bucket outside a weight update")
        receiver = self._ace_receiver(descriptor)
        try:
            named = self._ace_validate(receiver.unpack(descriptor))
            num_tensors = len(named)
            self._ace_reload_load(named)
            del named  # our references go before the receiver counts the remaining ones
            retained = receiver.loaded(descriptor)
        except BaseException as exc:
            self._ace_fail("load bucket", exc)
            raise
        return {"num_tensors": num_tensors, "retained": retained}

    def ace_finish_weight_update(self, version: int) -> dict[str, Any]:
        """Finalise update `version`; returns {"version": int, "num_tensors": int}."""
        state = self._ace_state()
        self._ace_check_usable()
        if state["active"] != version:
            raise RuntimeError(f"finish of version {version}, but the open update is {state['active']}")
        try:
            self._ace_check_complete()
            self._ace_reload_finish()
            for receiver in state["receivers"].values():
                receiver.finished()  # no view of memory the trainer goes on changing
        except BaseException as exc:
            self._ace_fail("finish", exc)
            raise
        state["version"] = version
        state["active"] = None
        return {"version": version, "num_tensors": len(state["received"])}

    # ---- vLLM's layerwise reload (shared by the update and the reference measurement) ------

    def _ace_reload_begin(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def _ace_reload_load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.get_model().load_weights(iter(named))

    def _ace_reload_finish(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        runner = self.model_runner
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(runner.get_model(), self.vllm_config.model_config)
        # Caches derived from the old weights (what `reload_weights` resets too).
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    # ---- reference measurement: the reload alone, fed tensors already in this process ------

    def ace_hold_weights(self, descriptor: dict[str, Any]) -> int:
        """Keep a private copy of one bucket's tensors in this process (for
        `ace_time_held_reload`); returns how many tensors were kept. A tied head is left out,
        as an update leaves it out."""
        self._ace_check_usable()
        tied = bool(getattr(self.vllm_config.model_config.hf_config, "tie_word_embeddings", False))
        held = self._ace_state().setdefault("held", [])
        receiver = self._ace_receiver(descriptor)
        named = receiver.unpack(descriptor)
        kept = [(n, t.clone()) for n, t in named if not (tied and n == _TIED_HEAD)]
        del named
        receiver.loaded(descriptor)  # the copies are ours: the transport's memory is not kept
        held.extend(kept)
        return len(kept)

    def ace_time_held_reload(self) -> float:
        """Seconds of vLLM's layerwise reload (begin, one `load_weights` over every held
        tensor, finish) fed the held tensors: the floor of any transport, since the bytes are
        already here. A measurement aid: it loads the weights for real (a failure is as fatal
        as in an update) but keeps the weight version and the prefix cache."""
        state = self._ace_state()
        self._ace_check_usable()
        if state["active"] is not None:
            raise RuntimeError(f"weight update {state['active']} is open")
        held = state.get("held") or []
        if not held:
            raise RuntimeError("ace_time_held_reload: no weights held (call ace_hold_weights)")
        start = time.perf_counter()
        try:
            self._ace_reload_begin()
            self._ace_reload_load(held)
            self._ace_reload_finish()
        except BaseException as exc:
            self._ace_fail("held reload", exc)
            raise
        return time.perf_counter() - start

    def ace_drop_held_weights(self) -> None:
        self._ace_state().pop("held", None)

    # ---- checks ----------------------------------------------------------------------------

    def _ace_validate(self, named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Reject unknown names, wrong shapes, non-float tensors and duplicates; drop a tied
        head (vLLM shares it with the embedding, loading it would count the embedding twice)."""
        manifest = self._ace_manifest()
        tied = bool(getattr(self.vllm_config.model_config.hf_config, "tie_word_embeddings", False))
        received = self._ace_state()["received"]
        kept = []
        for name, tensor in named:
            if not tensor.is_floating_point():
                raise TypeError(f"weight {name!r}: dtype {tensor.dtype} is not floating point")
            if tied and name == _TIED_HEAD:
                continue
            if manifest is not None:
                if name not in manifest:
                    raise KeyError(f"weight {name!r} is not in the engine's checkpoint")
                if tuple(tensor.shape) != manifest[name]:
                    raise ValueError(
                        f"weight {name!r}: shape {tuple(tensor.shape)}, the checkpoint has {manifest[name]}"
                    )
            if name in received:
                raise ValueError(f"weight {name!r} sent twice in one update")
            received.add(name)
            kept.append((name, tensor))
        return kept

    def _ace_check_complete(self) -> None:
        manifest = self._ace_manifest()
        if manifest is None:
            return
        received = self._ace_state()["received"]
        tied = bool(getattr(self.vllm_config.model_config.hf_config, "tie_word_embeddings", False))
        missing = sorted(set(manifest) - received - ({_TIED_HEAD} if tied else set()))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"weight update is missing {len(missing)} tensor(s): {shown}")
