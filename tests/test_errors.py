"""Bad input: one line naming the file or tensor, non-zero exit, no traceback, no DST left behind."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import make_llama

from bitengine.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "src"
    make_llama(d, tokenizer=False)
    return d


def clone(good, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(good, src)
    return src


def run_convert(capsys, src, dst, *extra):
    code = main(["convert", str(src), str(dst), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def check_failed(code, err, dst, *needles):
    assert code == 1
    assert len(err) == 1 and err[0].startswith("bitengine: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial*")), "temporary folder left behind"


def test_missing_config(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    (src / "config.json").unlink()
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "config.json", "not found")


def test_malformed_config(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    (src / "config.json").write_text("{ not json")
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "config.json", "malformed JSON")


def test_config_missing_field(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "hidden_size")


def test_unsupported_architecture(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "unsupported architecture")


def test_truncated_safetensors(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "model.safetensors", "truncated")


def test_shape_mismatch(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(sd, str(src / "model.safetensors"))
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "model.layers.1.mlp.up_proj.weight", "shape")


def test_nan_weights(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(src / "model.safetensors"))
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "model.layers.0.self_attn.v_proj.weight", "NaN")


def test_missing_tensor(good, tmp_path, capsys):
    src = clone(good, tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.1.post_attention_layernorm.weight"]
    save_file(sd, str(src / "model.safetensors"))
    check_failed(*run_convert(capsys, src, tmp_path / "dst"), tmp_path / "dst", "missing tensor",
                 "model.layers.1.post_attention_layernorm.weight")


def test_group_size_that_does_not_divide(good, tmp_path, capsys):
    # hidden 64 / intermediate 160: group 128 cannot tile K, refused before anything is written
    check_failed(*run_convert(capsys, good, tmp_path / "dst", "--scale", "group:128"), tmp_path / "dst", "group size 128")


def test_odd_in_features_are_padded(tmp_path):
    """K not a multiple of 4: the packing pads with zero weights (documented), and results are exact."""
    import bitengine

    hf = make_llama(tmp_path / "src", tokenizer=False, hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                    head_dim=12, intermediate_size=58)
    bitengine.convert(tmp_path / "src", tmp_path / "dst", weights="ternary", progress=False)
    model = bitengine.load(tmp_path / "dst", backend="reference")
    assert model.model.layers[0].mlp.down_proj.weight_packed.shape == (36, 15)  # ceil(58 / 4)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 5)))).all()
    del hf


def test_dst_exists(good, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    code = main(["convert", str(good), str(dst), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert (dst / "keep.txt").read_text() == "precious"
    assert main(["convert", str(good), str(dst), "--no-progress", "--force"]) == 0
    assert (dst / "config.json").exists() and not (dst / "keep.txt").exists()


def test_load_rejects_corrupt_checkpoint(good, tmp_path, capsys):
    import bitengine

    bitengine.convert(good, tmp_path / "ck", progress=False)
    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.self_attn.q_proj.weight_packed"] = sd["model.layers.0.self_attn.q_proj.weight_packed"][:, :-1].clone()
    save_file(sd, str(f))
    code = main(["info", str(tmp_path / "ck")])
    assert code == 0  # info only reads metadata
    capsys.readouterr()
    code = main(["generate", str(tmp_path / "ck"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "q_proj.weight_packed" in err[0] and "shape" in err[0], err


def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitengine", "convert", str(tmp_path / "nope"), str(tmp_path / "dst")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"bitengine: error: {tmp_path / 'nope'}: no such file or folder"
