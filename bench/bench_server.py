"""Bounded load test of `bitengine serve`: N concurrent streaming clients for a fixed time, loopback only.

Starts the server in a subprocess on 127.0.0.1 (a bitengine checkpoint, or a random Llama built
offline with the tests' tiny tokenizer), then runs N clients (asyncio + httpx), each sending
streamed /v1/completions requests back to back (greedy, ignore_eos, fixed max_tokens) until the
time is up; requests in flight at the deadline are awaited. Reports requests/s, generated tokens/s,
latency and time-to-first-token p50/p99, and errors (must be 0); the server is then stopped with
SIGINT and must exit cleanly. Writes OUT.json and OUT.md.

    python bench/bench_server.py --out bench/results/server_cpu
    python bench/bench_server.py --device cuda --preset 1b --clients 32 --max-batch 32 --out bench/results/server_gpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
PRESETS = {  # random Llama shapes (the tests' 301-token tokenizer)
    "tiny": {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2},
    "small": {"hidden": 512, "intermediate": 1536, "layers": 8, "heads": 8, "kv_heads": 4},
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16, "kv_heads": 8},
}
PROMPTS = ["the cat is on it", "we be up to it as", "an apple of the tree", "hello world", "to be or not to be",
           "in the end it is", "he said that we", "on the other hand"]


def random_checkpoint(preset: str, workdir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from serving_fixtures import bitengine_checkpoint

    return bitengine_checkpoint(workdir, max_pos=2048, **PRESETS[preset])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    code = ("import sys; from bitengine.server import serve; "
            f"serve({str(ckpt)!r}, host='127.0.0.1', port={port}, device={args.device!r}, backend={args.backend!r}, "
            f"max_batch={args.max_batch}, max_queue={args.max_queue}, max_seq={args.max_seq}, model_name='bench', "
            f"drain_timeout=10, log_level='warning', cuda_graph={not args.no_cuda_graph}, compile={args.compile})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> dict:
    import httpx

    start = time.time()
    deadline, report = start + timeout, start + 10
    async with httpx.AsyncClient() as c:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
            status = "not listening"
            try:
                r = await c.get(url + "/health")
                if r.status_code == 200:
                    return r.json()
                body = r.json()
                status = " ".join(str(x) for x in (body.get("status", r.status_code), body.get("warmup_step")) if x)
            except (httpx.TransportError, ValueError):  # not listening yet, or a body that is not JSON
                pass
            if time.time() > report:  # a run cut by an outer time limit still shows how far start-up got
                print(f"waiting for the server: {status} after {time.time() - start:.0f} s", flush=True)
                report += 10
            await asyncio.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout} s")


async def client_loop(i: int, url: str, args, deadline: float, results: list, errors: list) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as c:
        n = 0
        while time.time() < deadline:
            body = {"model": "bench", "prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            n += 1
            t0 = time.perf_counter()
            ttft, tokens, done = None, 0, False
            try:
                async with c.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        ev = json.loads(data)
                        if "error" in ev:
                            errors.append(ev["error"]["message"])
                            break
                        if ttft is None and ev["choices"] and ev["choices"][0]["text"]:
                            ttft = time.perf_counter() - t0
                        if ev.get("usage"):
                            tokens = ev["usage"]["completion_tokens"]
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if done:
                results.append({"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens,
                                "end": time.time()})
            else:
                errors.append("stream ended without [DONE]")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def run(args) -> dict:
    tmp = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_server_")
        ckpt = random_checkpoint(args.preset, Path(tmp))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ckpt, port, args)
    try:
        health = await wait_healthy(url, proc)
        # warm-up: one request (first-call costs: kernel compilation, allocator)
        await client_loop(0, url, argparse.Namespace(max_tokens=4), time.time() + 0.001, [], [])
        results, errors = [], []
        start = time.time()
        deadline = start + args.duration
        await asyncio.gather(*(client_loop(i, url, args, deadline, results, errors) for i in range(args.clients)))
        elapsed = time.time() - start
        import httpx

        after = httpx.get(url + "/health").json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "device": args.device, "device_name": device_name(args.device), "backend": health.get("backend"),
        "decode": health.get("decode"),
        "model": str(args.checkpoint or f"random llama '{args.preset}' {PRESETS[args.preset]}"),
        "clients": args.clients, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
        "duration_s": round(elapsed, 2), "requests": len(results), "errors": len(errors), "error_samples": errors[:5],
        "requests_per_s": round(len(results) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
        "max_active_rows": after.get("max_active"), "server_exit_code": rc,
        "engine_stats": {k: after.get(k) for k in ("warmup_s", "warmup_prompts_s", "warmup_decode_s", "warmup_slowest",
                                                   "steps", "slowest_prefill_s", "slowest_step_s",
                                                   "steps_over_1s")},
        "load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _engine_line(e: dict) -> str:
    if not e.get("steps"):
        return "n/a"
    return f"{e['slowest_prefill_s']} s / {e['slowest_step_s']} s, {e['steps_over_1s']}"


def _warmup_line(e: dict) -> str:
    if e.get("warmup_s") is None:
        return "n/a (no warm-up)"
    if e.get("warmup_prompts_s") is None:  # an engine before the split
        return f"{e['warmup_s']} s"
    return (f"{e['warmup_s']} s (prompt lengths {e['warmup_prompts_s']} s, decode batch sizes {e['warmup_decode_s']} s; "
            f"slowest {e['warmup_slowest']})")


def markdown(r: dict) -> str:
    rows = [("device", f"{r['device']} ({r['device_name']}), backend {r['backend']}, decode step: {r.get('decode')}"),
            ("model", r["model"]),
            ("clients / max_batch / max_tokens", f"{r['clients']} / {r['max_batch']} / {r['max_tokens']}"),
            ("duration", f"{r['duration_s']} s"), ("requests", r["requests"]), ("errors", r["errors"]),
            ("requests/s", r["requests_per_s"]), ("generated tokens/s", r["tokens_per_s"]),
            ("latency p50 / p99", f"{r['latency_p50_s']} s / {r['latency_p99_s']} s"),
            ("time to first token p50 / p99", f"{r['ttft_p50_s']} s / {r['ttft_p99_s']} s"),
            ("most rows decoded together", r["max_active_rows"]),
            ("engine: slowest prefill / decode step, steps > 1 s", _engine_line(r.get("engine_stats") or {})),
            ("engine: start-up warm-up (graph captures included)", _warmup_line(r.get("engine_stats") or {})),
            ("server exit code (SIGINT)", r["server_exit_code"]),
            ("load average (1 min) / cores", f"{r['load_average_1m']} / {r['cpu_count']}"), ("date", r["date"])]
    return "| metric | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="bitengine checkpoint folder (default: a random Llama, see --preset)")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start requests")
    ap.add_argument("--no-cuda-graph", action="store_true", help="GPU: the engine's decode steps eagerly (A/B)")
    ap.add_argument("--compile", action="store_true", help="GPU: torch.compile the layers before the graphs")
    ap.add_argument("--out", default="bench/results/server_cpu", help="output path without extension")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    if r["errors"] or r["server_exit_code"] != 0:
        sys.exit(f"bench_server: {r['errors']} errors, server exit code {r['server_exit_code']}")


if __name__ == "__main__":
    main()
