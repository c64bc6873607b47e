"""The command line: convert, info, generate (plain, chat, stream), eval."""

import json

import pytest
from tinymodels import make_llama

from bitengine.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_llama(d / "src")
    assert main(["convert", str(d / "src"), str(d / "tern"), "--no-progress", "--scale", "channel"]) == 0
    return d / "tern"


def test_info(ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "14 ternary linear layers" in out and "scale channel" in out


def test_generate_plain_chat_stream(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "8", "--backend", "reference"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "8", "--backend", "reference",
                 "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["generate", str(ckpt), "--prompt", "hi", "--chat", "--max-new-tokens", "4", "--temperature", "0.8",
                 "--seed", "1"]) == 0


def test_eval(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    assert main(["eval", str(ckpt), "--text", str(text), "--max-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["tokens"] > 60
    assert result["generation"]["decode_tokens_per_s"] > 0


def test_eval_missing_text(ckpt, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: file not found" in capsys.readouterr().err
