"""FastAPI routes of the OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health.

Handlers validate and tokenize on the event loop, hand a Request to the Engine (engine.py) and
relay its events: as one JSON response, or as server-sent events (`data: {chunk}` ... `data: [DONE]`).
A client that disconnects cancels its request; the engine frees the row at the next step.
Errors use OpenAI's error object: 400 invalid request, 404 unknown model, 429 queue full,
503 shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import (
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    SamplingParams,
    async_sink,
)
from .schemas import ChatRequest, CompletionRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def create_app(engine: Engine, model_name: str, drain_timeout: float = 30.0) -> FastAPI:
    """The app; starting it starts the engine thread, shutting it down drains then stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_timeout)

    app = FastAPI(title="bitengine", lifespan=lifespan)
    app.state.engine, app.state.model_name = engine, model_name

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        else:
            msg = f"{loc or 'body'}: {err.get('msg')}"
        return JSONResponse(error_body(msg, param=loc or None), status_code=400)

    @app.get("/health")
    async def health():
        status = ("failed" if engine.failed else "draining" if not engine.accepting else
                  "starting" if engine.warmup_pending else "ok")
        body = {"status": status, "model": model_name, "active": engine.active(), "queued": len(engine.waiting),
                "max_batch": engine.max_batch, "max_queue": engine.max_queue, "context": engine.max_seq,
                "backend": getattr(engine.model, "backend_name", None), "decode": engine.decode_path, **engine.stats}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "bitengine",
                                            "max_model_len": engine.max_seq}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        _check(body)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            p = p[0]
        if engine.tokenizer is None:
            _no_tokenizer()
        if isinstance(p, str):
            ids = engine.tokenizer(p)["input_ids"]
        else:
            ids = list(p)
            bad = [i for i in ids if not 0 <= i < engine.model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary", "prompt")
        return await _respond(http, body, ids, 16, "text_completion", _completion_choice)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        _check(body)
        tok = engine.tokenizer or _no_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - templates raise arbitrary errors (e.g. role order)
            raise APIError(400, f"chat template rejected the messages: {e}", "messages") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _respond(http, body, ids, None, "chat.completion", _chat_choice)

    def _check(body) -> None:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist (this server has {model_name!r})", "model",
                           code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise APIError(400, bad[1], bad[0])

    async def _respond(http, body, ids: list[int], default_max: int | None, kind: str, choice):
        ctx = engine.max_seq
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {ctx} tokens",
                           "messages" if kind == "chat.completion" else "prompt", code="context_length_exceeded")
        room = ctx - len(ids)
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + prompt {len(ids)} tokens exceed this model's context of "
                           f"{ctx} tokens", "max_tokens", code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=max(body.top_k or 0, 0), seed=body.seed, stop=body.stop_list(),
                                ignore_eos=body.ignore_eos)
        queue, sink = async_sink(asyncio.get_running_loop())
        req = Request(ids, params, sink)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", type_="rate_limit_error", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, f"server unavailable: {e}", type_="server_error") from None
        meta = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": model_name}

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(req, queue, kind, meta, choice, usage, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ev = [], None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if ev.finish_reason:
                    break
                text.append(ev.text)
        finally:
            req.cancel()  # no-op once finished; frees the row if the client went away
        if ev.finish_reason in ("cancelled", "error"):
            raise APIError(503, ev.error or "request cancelled: server shutting down", type_="server_error")
        return {**meta, "object": kind, "choices": [choice("".join(text), ev.finish_reason, stream=False)],
                "usage": usage(ev.completion_tokens)}

    return app


async def _sse(req: Request, queue: asyncio.Queue, kind: str, meta: dict, choice, usage, include_usage: bool):
    """Server-sent events for a streamed request; closing the stream (client gone) cancels the request."""
    obj = kind + ".chunk" if kind == "chat.completion" else kind

    def chunk(choices, **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **extra})}\n\n"

    try:
        if kind == "chat.completion":
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            ev = await queue.get()
            if ev.finish_reason is None:
                yield chunk([choice(ev.text, None, stream=True)])
                continue
            if ev.finish_reason in ("cancelled", "error"):
                msg = ev.error or "request cancelled: server shutting down"
                yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n"
            else:
                yield chunk([choice("", ev.finish_reason, stream=True)])
                if include_usage:
                    yield chunk([], usage=usage(ev.completion_tokens))
            yield "data: [DONE]\n\n"
            return
    finally:
        req.cancel()


def _completion_choice(text: str, finish: str | None, stream: bool) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


def _chat_choice(text: str, finish: str | None, stream: bool) -> dict:
    if stream:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def _no_tokenizer():
    raise APIError(400, "this checkpoint has no tokenizer files, so the server cannot return text", "prompt")
