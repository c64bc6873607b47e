"""OpenAI request bodies (completions, chat completions) as pydantic models, and the checks on them.

Only what the engine can honour is accepted: one choice (`n` = 1), no logprobs, echo, best_of,
suffix, logit_bias or penalties; anything else is rejected with a one-line message (HTTP 400)
rather than silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # not OpenAI (vLLM's extension): -1 / 0 / None = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first request option this server cannot honour, else None."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported (only n=1)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence_penalty and frequency_penalty are not supported (use 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            return "stop", "stop takes up to 4 non-empty strings"
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)) and len(self.prompt) != 1:
            return "prompt", f"batched prompts ({len(self.prompt)}) are not supported; send one request per prompt"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools / function calling are not supported"
        return super().unsupported()


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
