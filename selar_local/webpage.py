"""The chat page that `selar serve` shows at `/`: static HTML, CSS and JavaScript in
selar_local/web/ (no build step, nothing fetched from elsewhere), talking to the server's
own /v1/chat/completions like any client. The published decoding defaults are written
into the page when the app is built, so the side panel starts where DecodeParams does."""
from __future__ import annotations

import json
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from selar_local.params import METHODS, DecodeParams

ASSETS_PREFIX = "/ui/"
# The page may load only its own files and talk only to this server.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_PLACEHOLDER = "{{SELAR_DEFAULTS}}"


def page_defaults(params: DecodeParams | None = None) -> dict:
    """The side panel's starting values for the knobs it shows: the served model's defaults
    (its recommended sampler, `Runtime.default_params()`), else DecodeParams'."""
    d = params or DecodeParams()
    return {"methods": list(METHODS),
            "params": {"method": d.method, "tau": d.tau, "lam": d.lam, "ks": d.ks, "temperature": d.temperature,
                       "max_tokens": d.max_tokens, "seed": d.seed},
            "top_k": d.top_k}


def page_html(params: DecodeParams | None = None) -> str:
    html = resources.files("selar_local").joinpath("web/index.html").read_text(encoding="utf-8")
    # Inside <script type="application/json">: "</" must not end the element.
    data = json.dumps(page_defaults(params)).replace("</", "<\\/")
    return html.replace(_PLACEHOLDER, data)


def add_chat_page(app: FastAPI, params: DecodeParams | None = None) -> None:
    html = page_html(params)
    headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(html, headers=headers)

    app.mount(ASSETS_PREFIX.rstrip("/"), StaticFiles(packages=[("selar_local", "web")]), name="chat-page")


def is_public(scope) -> bool:
    """The page and its files need no API key (they hold no data; the page asks for the
    key and sends it with its API calls)."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path == "/" or path.startswith(ASSETS_PREFIX))
