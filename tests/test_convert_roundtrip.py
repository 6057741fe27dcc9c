"""HF <-> Megatron conversion: bit-identical round trips at every layout, and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ace.checkpoint import convert
from megatron_ace.checkpoint import mcore_format as F
from megatron_ace.checkpoint.safetensors_stream import LazyReader, StreamingWriter, TensorEntry
from megatron_ace.model.config import preset


def make_hf(dirpath: Path, name: str, dtype=torch.float32, seed=0) -> Path:
    """Random HF Qwen2 weights by transformers itself (the independent reference layout)."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM

    cfg = preset(name)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(HFConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k != "torch_dtype"}))
    # Non-trivial norms and biases so a mix-up in the mapping cannot hide behind ones/zeros.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_()
    model.to(dtype).save_pretrained(dirpath, safe_serialization=True)
    return dirpath


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    r = LazyReader(d)
    return {n: r.get(n) for n in r.names()}


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_roundtrip_bit_identical(tmp_path, name):
    hf = make_hf(tmp_path / "hf", name)
    ref = hf_tensors(hf)
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        m = convert.hf_to_mcore(hf, tmp_path / f"m{tp}{pp}", tp=tp, pp=pp)
        out = convert.mcore_to_hf(m, tmp_path / f"hf{tp}{pp}")
        got = hf_tensors(out)
        assert set(got) == set(ref) - ({"lm_head.weight"} if name == "tiny-tied" else set())
        for k in got:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (tp, pp, k)
    # relayout TP2 -> PP2 -> HF is the same too
    r = convert.relayout(tmp_path / "m21", tmp_path / "r12", tp=1, pp=2)
    got = hf_tensors(convert.mcore_to_hf(r, tmp_path / "hfr"))
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bf16_kept_and_sharded_index(tmp_path):
    hf = make_hf(tmp_path / "hf", "tiny", dtype=torch.bfloat16)
    m = convert.hf_to_mcore(hf, tmp_path / "m", tp=2, pp=1)
    assert F.read_meta(m).dtype == "bfloat16"
    out = convert.mcore_to_hf(m, tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref, got = hf_tensors(hf), hf_tensors(out)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)


def test_hf_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf(tmp_path / "hf", "tiny-tied")
    out = convert.mcore_to_hf(convert.hf_to_mcore(hf, tmp_path / "m", tp=2, pp=2),
                              tmp_path / "out")
    a = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 1000, (2, 12))
    assert torch.equal(a(x).logits, b(x).logits)


def test_streaming_writer_readable_by_safetensors(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
          "c": torch.randn(4).to(torch.bfloat16)}
    entries = [TensorEntry(name=k, shape=tuple(v.shape), dtype=v.dtype) for k, v in ts.items()]
    with StreamingWriter(tmp_path / "x.safetensors", entries, {"format": "pt"}) as w:
        for k, v in ts.items():
            w.write(k, v)
    got = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], ts[k]) for k in ts)
    with pytest.raises(ValueError, match="expected tensor a next"):
        StreamingWriter(tmp_path / "y.safetensors", entries).write("b", ts["b"])


def _edit(hf: Path, fn) -> None:
    path = hf / "model.safetensors"
    ts = load_file(path)
    fn(ts)
    save_file(ts, path, metadata={"format": "pt"})


def test_bad_inputs_name_the_tensor(tmp_path):
    base = make_hf(tmp_path / "hf", "tiny")
    cases = {
        "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                    "missing tensor.*model.layers.1.mlp.up_proj.weight"),
        "extra": (lambda t: t.__setitem__("model.layers.9.foo", torch.zeros(2)),
                  "unexpected tensor.*model.layers.9.foo"),
        "shape": (lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight",
                                          torch.zeros(128, 128)),
                  r"model.layers.1.self_attn.k_proj.weight: expected shape \(64, 128\), "
                  r"found \(128, 128\)"),
        "dtype": (lambda t: t.__setitem__("model.norm.weight", torch.zeros(128).half()),
                  "model.norm.weight: dtype"),
    }
    for case, (fn, pattern) in cases.items():
        d = tmp_path / case
        shutil.copytree(base, d)
        _edit(d, fn)
        with pytest.raises(ValueError, match=pattern):
            convert.hf_to_mcore(d, tmp_path / f"out-{case}")
        assert not (tmp_path / f"out-{case}").exists()
    d = tmp_path / "arch"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert.hf_to_mcore(d, tmp_path / "out-arch")


def test_tied_lm_head_equal_is_ignored_unequal_rejected(tmp_path):
    base = make_hf(tmp_path / "hf", "tiny-tied")
    _edit(base, lambda t: t.__setitem__("lm_head.weight",
                                        t["model.embed_tokens.weight"].clone()))
    convert.hf_to_mcore(base, tmp_path / "ok")
    _edit(base, lambda t: t.__setitem__("lm_head.weight",
                                        t["model.embed_tokens.weight"] + 1))
    with pytest.raises(ValueError, match="lm_head.weight"):
        convert.hf_to_mcore(base, tmp_path / "bad")


def test_rank_files_match_live_model(tmp_path, monkeypatch):
    """The converter's rank file equals what a live megatron-core model saves (TP1/PP1)."""
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_ace.model.weights import load_hf_into_model

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29577").items():
        monkeypatch.setenv(k, v)
    hf = make_hf(tmp_path / "hf", "tiny")
    m = convert.hf_to_mcore(hf, tmp_path / "m")
    ps = init_parallel(ParallelConfig())
    try:
        model = build_model(preset("tiny"), ps)
        reader = LazyReader(hf)
        load_hf_into_model(model, reader.get, preset("tiny"), ps)
        F.save_model_shards(model, tmp_path / "live", 0, 0)
        state = F.load_rank_state(m, 0, 0)
        F.check_keys(model, state)
        live = F.load_rank_state(tmp_path / "live", 0, 0)
        assert set(live) == set(state)
        assert all(torch.equal(live[k], state[k]) for k in state)
    finally:
        destroy_parallel()
