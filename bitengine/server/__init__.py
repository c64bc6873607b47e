"""`bitengine serve`: an OpenAI-compatible HTTP server with continuous batching.

app.py holds the routes, schemas.py the request bodies, engine.py the batching scheduler.
Needs the "serve" extra (fastapi, uvicorn).
"""

from __future__ import annotations

from pathlib import Path


def build(path, *, device: str = "cpu", backend: str | None = None, adapters=None, adapter_mode: str = "fused",
          dtype=None, head: str | None = None, max_batch: int = 8, max_queue: int = 64, max_seq: int | None = None,
          model_name: str | None = None, drain_timeout: float = 30.0, warmup: bool = False, cuda_graph: bool = True,
          compile: bool = False):
    """Load the checkpoint at `path` and return (FastAPI app, Engine); the engine starts with the app.

    warmup: run each decode batch size and a range of prefill lengths once before serving (/health says
    "starting" meanwhile), so kernel compilation and autotuning do not land on the first requests.
    cuda_graph / compile (GPU): replay the decode steps from CUDA graphs; torch.compile the layers first."""
    from ..loader import load
    from .app import create_app
    from .engine import Engine

    extra = {"head": head} if head else {}
    model = load(path, device=device, backend=backend, max_seq=max_seq, adapters=adapters, adapter_mode=adapter_mode,
                 dtype=dtype, **extra)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, max_seq=max_seq, warmup=warmup,
                    cuda_graph=cuda_graph, compile=compile)
    return create_app(engine, model_name or Path(path).resolve().name, drain_timeout), engine


def make_server(app, engine, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                log_level: str = "info"):
    """A uvicorn.Server whose shutdown first drains the engine: in-flight requests finish for up to
    `drain_timeout` s, then end with an error event (streams) or 503; uvicorn's own hard deadline
    comes 5 s later, so connections close cleanly instead of being cut."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.begin_drain(drain_timeout)
            await super().shutdown(sockets=sockets)

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5)
    return DrainingServer(cfg)


def serve(path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", backend: str | None = None,
          adapters=None, adapter_mode: str = "fused", dtype=None, head: str | None = None, max_batch: int = 8,
          max_queue: int = 64, max_seq: int | None = None,
          model_name: str | None = None, drain_timeout: float = 30.0, log_level: str = "info",
          warmup: bool = True, cuda_graph: bool = True, compile: bool = False) -> None:
    """Serve the checkpoint at `path` until interrupted (Ctrl-C / SIGTERM drain in-flight requests
    for up to `drain_timeout` seconds, then cancel what is left)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("bitengine serve needs fastapi and uvicorn: pip install 'bitengine[serve]'") from None
    app, engine = build(path, device=device, backend=backend, adapters=adapters, adapter_mode=adapter_mode, dtype=dtype,
                        head=head, max_batch=max_batch, max_queue=max_queue, max_seq=max_seq, model_name=model_name,
                        drain_timeout=drain_timeout, warmup=warmup, cuda_graph=cuda_graph, compile=compile)
    print(f"bitengine serve: {app.state.model_name} on {device} ({engine.model.backend_name} backend, decode: "
          f"{engine.decode_path}), "
          f"max_batch {max_batch}, max_queue {max_queue}, context {engine.max_seq}: http://{host}:{port}/v1",
          flush=True)
    try:
        make_server(app, engine, host, port, drain_timeout, log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its graceful shutdown; that is a clean exit
        pass
