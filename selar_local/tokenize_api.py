"""`POST /tokenize` and `POST /detokenize`, as llama-server has them:

    POST /tokenize    {"content": "...", "add_special": false, "with_pieces": false}
                      -> {"tokens": [ids]}  (with_pieces: [{"id": id, "piece": text}])
    POST /detokenize  {"tokens": [ids]} -> {"content": "..."}

An optional "model" picks the model (loading it if needed); without one, the model most
recently used. Errors in OpenAI's shape, as the other /v1 endpoints."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from selar_local.model_pool import ModelPool
from selar_local.openai_schema import RequestError


def _tokenize(model, body: dict[str, Any]) -> dict[str, Any]:
    content = body.get("content")
    if not isinstance(content, str):
        raise RequestError("'content' must be a string", param="content")
    add_special, with_pieces = body.get("add_special", False), body.get("with_pieces", False)
    for name, value in (("add_special", add_special), ("with_pieces", with_pieces)):
        if not isinstance(value, bool):
            raise RequestError(f"'{name}' must be true or false", param=name)
    tokens = model.tokenize(content, add_special=add_special, parse_special=True)
    if not with_pieces:
        return {"tokens": tokens}
    pieces = []
    for token in tokens:
        raw = model.token_bytes(token)
        try:
            piece: Any = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: its bytes, as llama-server does
            piece = list(raw)
        pieces.append({"id": token, "piece": piece})
    return {"tokens": pieces}


def _detokenize(model, body: dict[str, Any]) -> dict[str, Any]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError("'tokens' must be a list of token ids", param="tokens")
    bad = [t for t in tokens if not 0 <= t < model.n_vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {model.n_vocab})", param="tokens")
    return {"content": model.detokenize(tokens)}


def add_tokenize_routes(app: FastAPI, pool: ModelPool) -> None:
    from selar_local.server import _read_json, _response_for, acquire_model

    async def run(request: Request, handler):
        lease = None
        try:
            body = await _read_json(request)
            lease = await acquire_model(pool, body)
            return handler(lease.selar.runtime.model, body)
        except Exception as exc:  # noqa: BLE001 - OpenAI-shaped errors
            return _response_for(exc)
        finally:
            if lease is not None:
                lease.release()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await run(request, _tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await run(request, _detokenize)
