"""One-GPU check of megatron-ace: parity on CUDA, training-step MFU, and weight gather/reshard speed.

Needs only Python 3.12, torch with CUDA and megatron-core (bench/gpu_check.sh installs it from a
wheel carried in bench/wheels); Transformer Engine, apex, flash-attn, transformers and vLLM are
all optional. Four sections, each timed against a baseline measured in the same run:

1. parity   - a small Qwen2 on Megatron-Core (float32, TF32 off) against a plain-torch Qwen2
              forward written here (and HF transformers too when it is installed): max |diff|
              of next-token log-probabilities, for each attention kind in use.
2. mfu      - one training step (forward, backward, fused AdamW) of a Qwen2.5-shaped model in
              bfloat16 (default qwen2.5-1.5b) on Megatron-Core, local spec, unfused attention
              and an SDPA-backed core attention (TE spec instead when TE is usable), against the
              plain-torch model with torch's SDPA at the same size and batch. Model FLOPs per
              token: 6 N (N = matmul parameters, the output layer included) + 12 L h_q S
              (attention, no causal discount, as in the PaLM paper's MFU). Peak: dense bf16 of
              the card.
3. grpo     - the trainer side of one GRPO step (fused on-policy forward/backward + AdamW) of
              qwen2.5-1.5b in bf16 on long-tailed rollouts capped at 8K: packed THD micro-batches
              (TE attention, or the SDPA core attention) against rows padded to the step's
              longest, same rollouts and weights; real tokens per second.
4. reshard  - a 7B-shaped weight set (qwen2.5-7b, bfloat16, 15.2 GB) held as TP shards on the
              GPU; time to rebuild full HF-layout tensors (mapping.unshard + split_hf, contiguous)
              and to reshard to another TP size (unshard + shard), against a device-to-device
              copy of the same bytes (a clone of every shard).

    bash bench/gpu_check.sh                      # about 8 minutes on one H100 / H200
    python bench/gpu_check.py --cpu-smoke        # tiny sizes on the CPU: exercises every path

Prints a table and writes JSON (`--out`). Exit code 1 when a section fails or parity is above
tolerance. What it does not measure: multi-GPU collectives (the TP all-gather itself), vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

from megatron_ace.model import mapping as M  # noqa: E402
from megatron_ace.model.config import Qwen2Config, preset  # noqa: E402

# Dense bf16 peak (TFLOP/s) by device name, from NVIDIA's data sheets (no sparsity).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))
PARITY_CFG = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=704, num_layers=2,
                         num_attention_heads=4, num_query_groups=2, max_position_embeddings=512,
                         rope_theta=1e6)


@dataclasses.dataclass(kw_only=True)
class CheckConfig:
    """What to run and at which sizes."""

    device: str
    """'cuda' or 'cpu' (smoke mode)."""
    mfu_preset: str = "qwen2.5-1.5b"
    """Model shape of the MFU section."""
    micro_batch: int = 4
    """Sequences per training step (halved on out-of-memory)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    steps: int = 10
    """Timed training steps per model (after 3 warm-up steps)."""
    reshard_preset: str = "qwen2.5-7b"
    """Weight-set shape of the reshard section."""
    src_tp: int = 4
    """TP size the weights are held at."""
    dst_tp: int = 8
    """TP size they are resharded to."""
    repeats: int = 3
    """Timed passes of the reshard section (best is reported)."""
    parity_tol: float = 1e-3
    """Max |logprob diff| allowed in float32."""
    grpo_preset: str = "qwen2.5-1.5b"
    """Model shape of the GRPO section."""
    grpo_cap: int = 8192
    """Response length cap of the GRPO section's rollouts (median a third of it)."""
    grpo_prompts: int = 4
    """Prompts of the GRPO section's step."""
    grpo_group: int = 8
    """Rollouts per prompt of the GRPO section."""

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"CheckConfig.device must be cuda or cpu, got {self.device!r}")
        for name in ("micro_batch", "seq_len", "steps", "src_tp", "dst_tp", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"CheckConfig.{name} must be >= 1, got {getattr(self, name)}")


# ---- timing -----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---- the plain-torch reference Qwen2 (HF names, HF semantics) ---------------------------------
def random_hf_state(cfg: Qwen2Config, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in M.hf_shapes(cfg).items():
        # Norm weights near 1 (as trained models have), everything else small.
        base, std = (1.0, 0.1) if name.endswith("norm.weight") else (0.0, 0.02)
        state[name] = (base + std * torch.randn(shape, generator=gen, device=device)).to(dtype)
    return state


class RefQwen2(torch.nn.Module):
    """Qwen2 decoder in plain torch: RMSNorm, rotary (half-split), GQA attention with q/k/v
    bias through torch's scaled_dot_product_attention, SwiGLU MLP. Parameters use HF names
    (dots replaced by '__' since nn.Module names cannot hold dots)."""

    def __init__(self, cfg: Qwen2Config, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v.detach().clone()) for k, v in state.items()})

    def w(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def _norm(self, x_BSH: torch.Tensor, name: str) -> torch.Tensor:
        x = x_BSH.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return self.w(name) * x.to(x_BSH.dtype)

    def _rope(self, S: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.kv_channels
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
        freqs = torch.outer(torch.arange(S, device=device).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _rotate(x_BNSD: torch.Tensor, cos_SD, sin_SD) -> torch.Tensor:
        x1, x2 = x_BNSD.chunk(2, dim=-1)
        return x_BNSD * cos_SD + torch.cat([-x2, x1], dim=-1) * sin_SD

    def _attention(self, x_BSH, p: str, cos, sin) -> torch.Tensor:
        cfg, (B, S, _) = self.cfg, x_BSH.shape
        d, nq, nkv = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
        q = F.linear(x_BSH, self.w(p + "q_proj.weight"), self.w(p + "q_proj.bias"))
        k = F.linear(x_BSH, self.w(p + "k_proj.weight"), self.w(p + "k_proj.bias"))
        v = F.linear(x_BSH, self.w(p + "v_proj.weight"), self.w(p + "v_proj.bias"))
        q_BNSD = self._rotate(q.view(B, S, nq, d).transpose(1, 2), cos, sin)
        k_BGSD = self._rotate(k.view(B, S, nkv, d).transpose(1, 2), cos, sin)
        v_BGSD = v.view(B, S, nkv, d).transpose(1, 2)
        rep = nq // nkv
        out = F.scaled_dot_product_attention(q_BNSD, k_BGSD.repeat_interleave(rep, 1),
                                             v_BGSD.repeat_interleave(rep, 1), is_causal=True)
        return F.linear(out.transpose(1, 2).reshape(B, S, nq * d), self.w(p + "o_proj.weight"))

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V]."""
        cfg = self.cfg
        x = F.embedding(tokens_BS, self.w("model.embed_tokens.weight"))
        cos, sin = self._rope(tokens_BS.shape[1], x.device, x.dtype)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            x = x + self._attention(self._norm(x, p + "input_layernorm.weight"), p + "self_attn.",
                                    cos, sin)
            h = self._norm(x, p + "post_attention_layernorm.weight")
            gate = F.linear(h, self.w(p + "mlp.gate_proj.weight"))
            up = F.linear(h, self.w(p + "mlp.up_proj.weight"))
            x = x + F.linear(F.silu(gate) * up, self.w(p + "mlp.down_proj.weight"))
        x = self._norm(x, "model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return F.linear(x, self.w(head))


# ---- Megatron-Core model, with a choice of core attention ----------------------------------------
def _fused_kernels_present() -> bool:
    """apex / megatron fused softmax kernels (absent on a bare machine)."""
    try:
        import scaled_masked_softmax_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_config_overrides(attention: str) -> dict:
    """TransformerConfig changes a bare CUDA machine needs on top of the builder's defaults."""
    if not torch.cuda.is_available():
        return {}
    overrides = {}
    if attention != "te":
        # Without apex the local spec's torch norms refuse persist_layer_norm, and the fused
        # softmax path imports a kernel module that only apex / TE builds provide.
        overrides["persist_layer_norm"] = False
        overrides["masked_softmax_fusion"] = _fused_kernels_present()
    if not (shutil.which("cc") or shutil.which("gcc")):
        # megatron's bias-activation / bias-dropout fusions are torch.compile'd; Triton needs
        # a C compiler to build its launcher, so without one they would fail at the first step.
        overrides["bias_activation_fusion"] = False
        overrides["bias_dropout_fusion"] = False
    return overrides


def build_mcore(cfg: Qwen2Config, ps, dtype: torch.dtype, attention: str):
    """GPTModel via megatron_ace's builder; `attention` is 'local' (megatron's unfused
    DotProductAttention), 'sdpa' (model/attention.py) or 'te'."""
    from megatron_ace.model import builder
    from megatron_ace.model.attention import CoreAttention
    from megatron_ace.model.mapping import Spec

    overrides = gpu_config_overrides(attention)
    core = CoreAttention.SDPA if attention == "sdpa" else CoreAttention.UNFUSED
    return builder.build_model(cfg, ps, dtype=dtype, core_attention=core,
                               spec=Spec.TE if attention == "te" else Spec.LOCAL, **overrides)


def attention_kinds() -> list[str]:
    from megatron_ace.model.spec import te_usable

    return ["te", "sdpa"] if te_usable() else ["local", "sdpa"]


def mcore_logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)
    return model(tokens_BS, pos, None)


# ---- section 1: parity ----------------------------------------------------------------------------
def check_parity(cc: CheckConfig, ps) -> dict:
    from megatron_ace.model.weights import load_hf_into_model

    cfg = PARITY_CFG
    state = random_hf_state(cfg, cc.device, torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(cc.device)
    with torch.no_grad():
        ref = F.log_softmax(RefQwen2(cfg, state).to(cc.device)(tokens).float(), -1)
    out: dict = {"reference": "plain torch", "tolerance": cc.parity_tol}
    for kind in attention_kinds():
        model = build_mcore(cfg, ps, torch.float32, kind)
        load_hf_into_model(model, state.__getitem__, cfg, ps)
        model.eval()
        with torch.no_grad():
            logp = F.log_softmax(mcore_logits(model, tokens)[..., : cfg.vocab_size].float(), -1)
        out[f"mcore_{kind}_vs_ref"] = (logp - ref).abs().max().item()
        del model
    try:
        from transformers import Qwen2Config as HFConfig
        from transformers import Qwen2ForCausalLM
    except ImportError:
        out["hf_vs_ref"] = None  # transformers absent: the plain-torch reference stands alone
    else:
        hf = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config(), attn_implementation="eager")).float()
        hf.load_state_dict(state, strict=True)
        with torch.no_grad():
            hf_logp = F.log_softmax(hf.to(cc.device)(tokens).logits.float(), -1)
        out["hf_vs_ref"] = (hf_logp - ref).abs().max().item()
    diffs = [v for k, v in out.items() if k.endswith("_vs_ref") and v is not None]
    out["ok"] = max(diffs) <= cc.parity_tol
    return out


# ---- section 2: training-step MFU -------------------------------------------------------------------
def model_flops_per_token(cfg: Qwen2Config, seq_len: int) -> float:
    emb = cfg.vocab_size * cfg.hidden_size
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else emb)
    q_width = cfg.num_attention_heads * cfg.kv_channels
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * q_width * seq_len


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _train_steps(step_fn, params, cc: CheckConfig) -> float:
    """Median seconds of one step (forward, backward, fused AdamW) after 3 warm-up steps."""
    fused = cc.device == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused, foreach=not fused)
    times = []
    for i in range(3 + cc.steps):
        def one():
            opt.zero_grad(set_to_none=True)
            step_fn().backward()
            opt.step()
        seconds = timed(one, cc.device)
        if i >= 3:
            times.append(seconds)
    return sorted(times)[len(times) // 2]


def _measure_one(kind: str, cfg: Qwen2Config, ps, cc: CheckConfig, mbs: int) -> float:
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (mbs, cc.seq_len + 1), generator=gen).to(cc.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    dtype = torch.bfloat16
    if kind == "torch_sdpa":
        model = RefQwen2(cfg, random_hf_state(cfg, cc.device, dtype)).to(cc.device)

        def step():
            logits = model(inputs)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    else:
        # Torch norms keep float32 weights; Megatron-LM's Float16Module casts the whole module
        # to bf16 for bf16 training, and so does this.
        model = build_mcore(cfg, ps, dtype, kind.removeprefix("mcore_")).to(dtype)
        model.train()
        pos = torch.arange(cc.seq_len, device=cc.device).expand_as(inputs)

        def step():
            return model(inputs, pos, None, labels=labels).float().mean()
    # The model, its optimizer and activations are freed when this frame returns.
    return _train_steps(step, [p for p in model.parameters() if p.requires_grad], cc)


def check_mfu(cc: CheckConfig, ps) -> dict:
    cfg = preset(cc.mfu_preset, max_position_embeddings=max(4096, cc.seq_len))
    kinds = ["torch_sdpa"] + [f"mcore_{k}" for k in attention_kinds()]
    mbs = cc.micro_batch
    while True:  # every model runs at the same batch: halve it for all on out-of-memory
        try:
            seconds = {}
            for kind in kinds:
                seconds[kind] = _measure_one(kind, cfg, ps, cc, mbs)
                if cc.device == "cuda":
                    torch.cuda.empty_cache()  # hand the next model a clean allocator
            break
        except torch.OutOfMemoryError:
            if mbs == 1:
                raise
            mbs //= 2
            torch.cuda.empty_cache()
    flops = model_flops_per_token(cfg, cc.seq_len)
    peak = peak_tflops(cc.device)
    tokens = mbs * cc.seq_len
    models = {}
    for kind, secs in seconds.items():
        tflops = flops * tokens / secs / 1e12
        models[kind] = {"step_s": secs, "tokens_per_s": tokens / secs, "tflops": tflops,
                        "mfu": tflops / peak if peak else None,
                        "over_torch_sdpa": seconds["torch_sdpa"] / secs}
    return {"preset": cc.mfu_preset, "seq_len": cc.seq_len, "micro_batch": mbs,
            "config_overrides": {k: gpu_config_overrides(k) for k in attention_kinds()},
            "dtype": "bfloat16", "flops_per_token": flops, "peak_tflops": peak,
            "models": models, "ok": True}


# ---- section 3: gather / reshard a 7B-shaped weight set ---------------------------------------------
def _shards(cfg: Qwen2Config, tp: int, device: str) -> list[tuple[M.Rule, int | None, list]]:
    padded = M.padded_vocab_size(cfg.vocab_size, tp)
    held = []
    for rule, layer in M.iter_rules(cfg, M.Spec.LOCAL):
        meta = torch.empty(M.full_shape(rule, layer, cfg, padded), device="meta")
        shapes = [tuple(M.shard(rule, meta, r, tp).shape) for r in range(tp)]
        held.append((rule, layer, [torch.empty(s, dtype=torch.bfloat16, device=device).normal_()
                                   for s in shapes]))
    return held


def check_reshard(cc: CheckConfig) -> dict:
    cfg = preset(cc.reshard_preset)
    held = _shards(cfg, cc.src_tp, cc.device)
    num_bytes = sum(t.numel() * t.element_size() for _, _, ts in held for t in ts)

    def copy_all():
        for _, _, ts in held:
            for t in ts:
                t.clone()

    def to_hf():
        for rule, _, ts in held:
            for t in M.split_hf(rule, M.unshard(rule, ts), cfg):
                t.contiguous()

    def reshard():
        for rule, _, ts in held:
            full = M.unshard(rule, ts)
            if rule.vocab:  # the vocabulary padding depends on the TP size
                full = M.merge_hf(rule, M.split_hf(rule, full, cfg), cfg,
                                  M.padded_vocab_size(cfg.vocab_size, cc.dst_tp))
            for r in range(cc.dst_tp):
                M.shard(rule, full, r, cc.dst_tp).contiguous()

    best = {name: min(timed(fn, cc.device) for _ in range(cc.repeats))
            for name, fn in (("d2d_copy", copy_all), ("to_hf", to_hf), ("reshard", reshard))}
    held.clear()
    out = {"preset": cc.reshard_preset, "src_tp": cc.src_tp, "dst_tp": cc.dst_tp,
           "num_bytes": num_bytes, "seconds": best,
           "gb_per_s": {k: num_bytes / 1e9 / v for k, v in best.items()},
           "to_hf_over_copy": best["to_hf"] / best["d2d_copy"],
           "reshard_over_copy": best["reshard"] / best["d2d_copy"], "ok": True}
    return out


# ---- section 4: the GRPO trainer step, packed vs padded ---------------------------------------------
def check_grpo(cc: CheckConfig, ps) -> dict:
    """Trainer side of one GRPO step (fused on-policy forward/backward + AdamW) of a Qwen2.5
    shape in bf16 on long-tailed rollouts capped at `grpo_cap` (AceReason stage 1: 8K):
    packed THD micro-batches vs rows padded to the step's longest, same rollouts and weights."""
    import argparse as _argparse

    from bench_grpo_update import make_rollouts, make_trainer, time_update

    cfg = preset(cc.grpo_preset, max_position_embeddings=max(4096, 2 * cc.grpo_cap))
    kind = "te" if "te" in attention_kinds() else "sdpa"
    shape = _argparse.Namespace(prompts=cc.grpo_prompts, group=cc.grpo_group,
                                median=cc.grpo_cap // 3, sigma=0.9, cap=cc.grpo_cap, seed=0)
    rollouts, keep = make_rollouts(shape, cfg.vocab_size)
    state = random_hf_state(cfg, cc.device, torch.bfloat16)
    runs = {}
    for layout in ("packed", "padded"):
        from megatron_ace.model.weights import load_hf_into_model

        model = build_mcore(cfg, ps, torch.bfloat16, kind).to(torch.bfloat16)
        load_hf_into_model(model, state.__getitem__, cfg, ps)
        trainer = make_trainer(model, cfg, ps, torch.bfloat16)
        if cc.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs[layout] = time_update(
            trainer, rollouts, keep, layout_name=layout, max_tokens=2 * cc.grpo_cap,
            micro_batch_size=2, warmup_rows=cc.grpo_group, sync=lambda: _sync(cc.device))
        if cc.device == "cuda":
            runs[layout]["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del model, trainer
        if cc.device == "cuda":
            torch.cuda.empty_cache()
    return {"preset": cc.grpo_preset, "attention": kind, "cap": cc.grpo_cap,
            "num_rollouts": len(rollouts), "runs": runs,
            "packed_over_padded": runs["packed"]["tokens_per_s"] / runs["padded"]["tokens_per_s"],
            "ok": True}


# ---- driver -----------------------------------------------------------------------------------------
def environment() -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0],
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import megatron.core
        info["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except ImportError as exc:
        info["megatron_core"] = f"missing ({exc})"
    return info


def table(report: dict) -> str:
    lines = ["| section | figure | baseline (same run) | ratio | status |", "|---|---|---|---|---|"]
    p = report.get("parity", {})
    if "error" not in p and p:
        figs = ", ".join(f"{k.removesuffix('_vs_ref')} {v:.1e}" for k, v in p.items()
                         if k.endswith("_vs_ref") and v is not None)
        lines.append(f"| parity (max abs logprob diff, fp32) | {figs} | plain-torch Qwen2 | | "
                     f"{'OK' if p['ok'] else 'FAIL'} |")
    m = report.get("mfu", {})
    if "error" not in m and m:
        base = m["models"]["torch_sdpa"]
        for kind, res in m["models"].items():
            mfu = f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] is not None else ""
            lines.append(f"| step {m['preset']} bs{m['micro_batch']}x{m['seq_len']}: {kind} | "
                         f"{res['tokens_per_s']:,.0f} tok/s, {res['tflops']:.1f} TFLOP/s{mfu} | "
                         f"torch SDPA {base['tokens_per_s']:,.0f} tok/s | "
                         f"{res['over_torch_sdpa']:.2f}x | OK |")
    g = report.get("grpo", {})
    if "error" not in g and g:
        base = g["runs"]["padded"]
        for name, res in g["runs"].items():
            lines.append(f"| GRPO step {g['preset']} cap {g['cap']} ({g['attention']}): {name} | "
                         f"{res['tokens_per_s']:,.0f} real tok/s, share "
                         f"{res['real_token_share']:.2f} | padded {base['tokens_per_s']:,.0f} "
                         f"tok/s | {res['tokens_per_s'] / base['tokens_per_s']:.2f}x | OK |")
    r = report.get("reshard", {})
    if "error" not in r and r:
        gb = r["num_bytes"] / 1e9
        for key, label in (("to_hf", f"TP{r['src_tp']} -> HF"),
                           ("reshard", f"TP{r['src_tp']} -> TP{r['dst_tp']}")):
            lines.append(f"| {r['preset']} {gb:.1f} GB {label} | {r['seconds'][key]:.3f} s, "
                         f"{r['gb_per_s'][key]:.1f} GB/s | d2d copy {r['seconds']['d2d_copy']:.3f} s"
                         f" ({r['gb_per_s']['d2d_copy']:.1f} GB/s) | "
                         f"{r[key + '_over_copy']:.2f}x | OK |")
    for name in ("parity", "mfu", "grpo", "reshard"):
        if "error" in report.get(name, {}):
            lines.append(f"| {name} | {report[name]['error'][:120]} | | | FAILED |")
    return "\n".join(lines)


def _config(args) -> CheckConfig:
    if args.cpu_smoke:
        return CheckConfig(device="cpu", mfu_preset="tiny", micro_batch=2, seq_len=64, steps=2,
                           reshard_preset="tiny", src_tp=2, dst_tp=1, repeats=1,
                           grpo_preset="tiny", grpo_cap=96, grpo_prompts=2, grpo_group=4)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --cpu-smoke for a CPU run of every path")
    return CheckConfig(device="cuda", mfu_preset=args.mfu_preset, micro_batch=args.micro_batch,
                       seq_len=args.seq_len, steps=args.steps, src_tp=args.src_tp,
                       dst_tp=args.dst_tp)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", "--dry-run", action="store_true", dest="cpu_smoke",
                    help="tiny sizes on the CPU (checks the script, measures nothing useful)")
    ap.add_argument("--only", nargs="+", choices=["parity", "mfu", "grpo", "reshard"],
                    default=["parity", "mfu", "grpo", "reshard"])
    ap.add_argument("--mfu-preset", default="qwen2.5-1.5b")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--src-tp", type=int, default=4)
    ap.add_argument("--dst-tp", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args(argv)
    cc = _config(args)
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {"environment": environment(), "config": dataclasses.asdict(cc)}
    ps = init_parallel(ParallelConfig(), seed=0)
    try:
        sections = {"parity": lambda: check_parity(cc, ps), "mfu": lambda: check_mfu(cc, ps),
                    "grpo": lambda: check_grpo(cc, ps), "reshard": lambda: check_reshard(cc)}
        for name in args.only:
            start = time.perf_counter()
            try:
                report[name] = sections[name]()
            except Exception as exc:  # report every section, even after one fails
                report[name] = {"error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc(), "ok": False}
            report[name]["section_s"] = time.perf_counter() - start
            sys.stdout.write(f"{name}: done in {report[name]['section_s']:.1f} s\n")
            sys.stdout.flush()
    finally:
        destroy_parallel()
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    sys.stdout.write(json.dumps(report["environment"]) + "\n" + table(report) + "\n")
    return 0 if all(report[n].get("ok") for n in args.only) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
