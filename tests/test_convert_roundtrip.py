"""HF <-> torch_dist conversion: bit-identical round trips at every layout, the layout a live
megatron-core model saves, the previous format still read, and bad inputs."""

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
from megatron_ace.model.config import Qwen2Config, preset


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


def _live_model(hf: Path, tp_pp=(1, 1)):
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.parallel import ParallelConfig, init_parallel
    from megatron_ace.model.weights import load_hf_into_model

    cfg = Qwen2Config.from_hf_config(hf)
    ps = init_parallel(ParallelConfig(tp=tp_pp[0], pp=tp_pp[1]))
    model = build_model(cfg, ps)
    load_hf_into_model(model, LazyReader(hf).get, cfg, ps)
    return model, ps


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_converter_writes_what_a_live_model_saves(tmp_path, monkeypatch, name):
    """Same keys, shapes, dtypes and values as megatron-core's own save of a live model holding
    the same weights; and megatron-core's own load fills a live model from the converter's."""
    from megatron.core import dist_checkpointing

    from megatron_ace.checkpoint import dist_io
    from megatron_ace.model.parallel import destroy_parallel

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    hf = make_hf(tmp_path / "hf", name)
    converted = convert.hf_to_mcore(hf, tmp_path / "m")
    try:
        model, ps = _live_model(hf)
        (tmp_path / "live").mkdir()
        dist_io.save(model.sharded_state_dict(), tmp_path / "live", dp_group=ps.dp_group)
        live_md = dist_io.read_index(tmp_path / "live").state_dict_metadata
        conv_md = dist_io.read_index(converted).state_dict_metadata
        assert set(live_md) == set(conv_md)
        for key, md in live_md.items():
            if hasattr(md, "size"):
                assert (md.size, md.properties.dtype) == (conv_md[key].size,
                                                          conv_md[key].properties.dtype), key
        plain = dist_checkpointing.load_plain_tensors(str(converted))
        live = dist_checkpointing.load_plain_tensors(str(tmp_path / "live"))
        assert set(plain) == set(live) and all(torch.equal(plain[k], live[k]) for k in live)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(converted))
        model.load_state_dict(loaded)
        again = {n: t for n, t in model.state_dict().items() if not n.endswith("_extra_state")}
        ref = _live_model(hf)[0].state_dict()
        assert all(torch.equal(t, ref[n]) for n, t in again.items())
    finally:
        destroy_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_previous_format(hf: Path, out: Path, tp: int, pp: int) -> Path:
    """A checkpoint in the previous release's safetensors-per-rank layout (format version 1),
    written here from its specification since the library no longer writes it."""
    from megatron_ace.model import mapping as M

    cfg = Qwen2Config.from_hf_config(hf)
    reader = LazyReader(hf)
    meta = F.CheckpointMeta(model=cfg, tp=tp, pp=pp, dtype="float32",
                            format=F.SAFETENSORS_PER_RANK)
    for t in range(tp):
        for p in range(pp):
            tensors = {}
            for entry, rule, layer in F.rank_entries(meta, t, p):
                full = M.merge_hf(rule, [reader.get(n) for n in M.expand(rule, layer)[1]], cfg,
                                  meta.padded_vocab)
                tensors[entry.name] = M.shard(rule, full, t, tp).contiguous()
            F.rank_file(out, t, p).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(F.rank_file(out, t, p)))
    (out / F.META_NAME).write_text(json.dumps({
        "format_version": 1, "hf_config": cfg.to_hf_config(), "tp": tp, "pp": pp,
        "dtype": "float32", "spec": "local", "padded_vocab": meta.padded_vocab,
        "iteration": 0, "tokenizer_dir": None}))
    return out


def test_previous_format_still_read_and_upgraded(tmp_path, caplog):
    hf = make_hf(tmp_path / "hf", "tiny")
    old = _write_previous_format(hf, tmp_path / "old", tp=2, pp=2)
    ref = hf_tensors(hf)
    with caplog.at_level("WARNING"):
        got = hf_tensors(convert.mcore_to_hf(old, tmp_path / "hf-old"))
    assert "previous safetensors-per-rank layout" in caplog.text and "relayout" in caplog.text
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    upgraded = convert.relayout(old, tmp_path / "new", tp=1, pp=1)
    assert F.read_meta(upgraded).format == F.TORCH_DIST
    got = hf_tensors(convert.mcore_to_hf(upgraded, tmp_path / "hf-new"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_damaged_checkpoint_names_the_file_and_keeps_the_output(tmp_path):
    hf = make_hf(tmp_path / "hf", "tiny")
    m = convert.hf_to_mcore(hf, tmp_path / "m", tp=2)
    out = convert.mcore_to_hf(m, tmp_path / "out")
    before = hf_tensors(out)
    shard = next(m.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:4096])
    with pytest.raises(ValueError, match=rf"{shard.name} is truncated"):
        convert.mcore_to_hf(m, tmp_path / "out")
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name} is missing"):
        convert.relayout(m, tmp_path / "out2", tp=1, pp=1)
    assert not (tmp_path / "out2").exists()
    after = hf_tensors(out)  # the earlier export is untouched
    assert all(torch.equal(after[k], before[k]) for k in before)
    (m / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"\.metadata is missing"):
        convert.mcore_to_hf(m, tmp_path / "out3")


def test_checkpoint_of_another_shape_is_refused(tmp_path, monkeypatch):
    """A checkpoint holding another model: the differing tensor and shapes are named."""
    hf = make_hf(tmp_path / "hf", "tiny")
    m = convert.hf_to_mcore(hf, tmp_path / "m")
    meta = json.loads((m / F.META_NAME).read_text())
    meta["hf_config"]["intermediate_size"] = 512  # what a mislabelled checkpoint would claim
    (m / F.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"linear_fc1.weight: shape \(2, 512, 128\), the model "
                                         r"needs \(2, 1024, 128\)"):
        convert.mcore_to_hf(m, tmp_path / "out")


def _cli(argv: list[str]) -> int:
    """tools/convert_checkpoint.py's `main`, run in this process."""
    import importlib.util

    from dist_utils import REPO

    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  REPO / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(argv)


def test_cli_round_trip_tp2_pp2_and_errors(tmp_path, capsys):
    """The command line: HF -> torch_dist chunked for TP2 x PP2 -> HF is bit-identical (bf16);
    a bad input exits 2 with the file named, and leaves no output behind."""
    hf = make_hf(tmp_path / "hf", "tiny", dtype=torch.bfloat16)
    m, out = tmp_path / "m", tmp_path / "out"
    assert _cli(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(m), "--tp", "2",
                 "--pp", "2"]) == 0
    meta = F.read_meta(m)
    assert (meta.format, meta.tp, meta.pp, meta.dtype) == (F.TORCH_DIST, 2, 2, "bfloat16")
    assert _cli(["mcore-to-hf", "--mcore-dir", str(m), "--out", str(out)]) == 0
    ref, got = hf_tensors(hf), hf_tensors(out)
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    (m / ".metadata").unlink()
    capsys.readouterr()
    assert _cli(["mcore-to-hf", "--mcore-dir", str(m), "--out", str(tmp_path / "out2")]) == 2
    assert ".metadata is missing" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
