"""HF <-> Megatron checkpoint conversion: bit-identical round trips at every TP/PP, re-layout,
validation errors that name the tensor, and logprob parity of a re-laid-out checkpoint."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_utils import REPO, torchrun
from megatron_ace.checkpoint.mcore_ckpt import hf_to_mcore, mcore_to_hf, relayout
from megatron_ace.model.config import preset

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _hf_model(path, name):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    cfg = preset(name)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.3)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    return cfg


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "hf"
    _hf_model(path, request.param)
    return path


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_roundtrip_is_bit_identical(hf_dir, tmp_path, tp, pp):
    mcore = hf_to_mcore(hf_dir, tmp_path / "m", tp=tp, pp=pp)
    moved = relayout(mcore, tmp_path / "m2", tp=pp, pp=tp)  # swap TP and PP on the way
    back = mcore_to_hf(moved, tmp_path / "hf2")
    src = load_file(str(hf_dir / "model.safetensors"))
    dst = load_file(str(back / "model.safetensors"))
    tied = json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"]
    expected = {k for k in src if not (tied and k == "lm_head.weight")}
    assert set(dst) == expected
    for name in expected:
        assert dst[name].dtype == src[name].dtype
        assert torch.equal(dst[name], src[name]), name
    assert (back / "tokenizer_config.json").is_file() and (back / "config.json").is_file()
    # The shards hold what each rank's model holds: vocabulary padded to 128 * TP rows.
    with safe_open(str(mcore / "model" / "tp00_pp000.safetensors"), "pt") as f:
        rows = f.get_slice("embedding.word_embeddings.weight").get_shape()[0]
    assert rows * tp == 128 * tp * -(-1000 // (128 * tp))


def test_export_loads_in_transformers(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    back = mcore_to_hf(hf_to_mcore(hf_dir, tmp_path / "m", tp=2), tmp_path / "hf2")
    a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_bad_inputs_name_the_tensor(tmp_path):
    src = tmp_path / "hf"
    _hf_model(src, "tiny")
    name = "model.layers.1.self_attn.k_proj.weight"
    _corrupt(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj"):
        hf_to_mcore(tmp_path / "missing", tmp_path / "o1")
    _corrupt(src, tmp_path / "shape", lambda t: t.__setitem__(name, torch.zeros(128, 128)))
    with pytest.raises(ValueError, match=r"k_proj\.weight: expected shape \(64, 128\).*found \(128, 128\)"):
        hf_to_mcore(tmp_path / "shape", tmp_path / "o2")
    _corrupt(src, tmp_path / "extra", lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight",
                                                                torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.9\.mlp\.up_proj"):
        hf_to_mcore(tmp_path / "extra", tmp_path / "o3")
    import shutil

    shutil.copytree(src, tmp_path / "arch")
    cfg = json.loads((tmp_path / "arch" / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "arch" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        hf_to_mcore(tmp_path / "arch", tmp_path / "o4")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_reports_errors(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-mcore",
                           "--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "error" in proc.stderr


@pytest.mark.dist
def test_relaid_checkpoint_scores_like_hf(tmp_path):
    """Converted at TP2, re-laid out to PP2, scored at TP1xPP2 and at TP2 (in-memory reshard)."""
    hf = tmp_path / "hf"
    _hf_model(hf, "tiny")
    m_tp2 = hf_to_mcore(hf, tmp_path / "m_tp2", tp=2)
    m_pp2 = relayout(m_tp2, tmp_path / "m_pp2", tp=1, pp=2)
    seqs = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(3)).tolist()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(seqs))
    ref = tmp_path / "ref.json"
    subprocess.run([sys.executable, "tools/score_logprobs.py", "--hf-dir", str(hf), "--tokens-file",
                    str(tokens), "--out", str(ref)], check=True, cwd=REPO, capture_output=True)
    for ckpt, args in ((m_pp2, ["--pp", "2"]), (m_pp2, ["--tp", "2"])):
        out = tmp_path / f"out_{'_'.join(args)}.json"
        torchrun(REPO / "tools" / "score_logprobs.py", "--mcore-dir", ckpt, "--tokens-file",
                 tokens, "--out", out, *args, nproc=2)
        got, want = json.loads(out.read_text()), json.loads(ref.read_text())
        diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
        assert len(got) == 3 and all(len(g) == 19 for g in got)
        assert diff <= 1e-4, (args, diff)
