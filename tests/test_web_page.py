"""The chat page `selar serve` shows at `/`, driven in headless Chromium (Debian's
`chromium` package, through Playwright for Python; no browser download) against a real
`selar serve` subprocess on loopback with the tests' small model (SmolLM2-135M).

The page's streamed answer is checked against the same request replayed over HTTP with
`selar_trace`: the tokens it renders, the soft steps it marks, and the candidates and
mixture weights its token detail shows. Skipped, with the reason, where no browser is
installed; `scripts/setup.sh test` installs one (apt-get, as root) and the driver.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import store_calibration
from selar_local.model_sampler import model_sampler
from selar_local.params import DecodeParams
from serve_helpers import running_server

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-page-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATION_TIMEOUT_MS = 300_000  # a bound for slow CI machines, not an expected duration
QUESTION = "Why is the sky blue?"


def _chromium() -> str | None:
    for candidate in (os.environ.get("SELAR_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


CHROMIUM = _chromium()
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright for Python is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium browser installed (apt-get install chromium; "
                             "`scripts/setup.sh test` does it when run as root)")
# Flags for a root, GPU-less, offline machine: nothing but the page's own server is contacted.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


CALIBRATED_TAU = 0.77  # stored for the server's cache below: the page's "auto" must show it


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    """`selar serve` with an API key and one slot (so a replayed request decodes alike), and a
    cache holding a calibration of the model (the on-demand calibration is tested elsewhere)."""
    cache = tmp_path_factory.mktemp("serve-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SELAR_CACHE_DIR", str(cache))
        store_calibration(smollm_path, CALIBRATED_TAU, model_sampler(smollm_path).apply(DecodeParams()))
    with running_server(smollm_path, "--n-ctx", "1024", api_key=KEY, env={"SELAR_CACHE_DIR": str(cache)}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    # Playwright gives the browser a fresh temporary --user-data-dir and runs it headless.
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.errors = _collect_errors(page)
    yield page
    context.close()


def _collect_errors(page) -> list[str]:
    """Uncaught exceptions and console errors, less Chromium's line for the 401 that
    makes the page ask for the key (that one is expected)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "status of 401" not in msg.text else None)
    return errors


def _until(check, what: str, timeout: float = 30.0):
    """Poll `check()` until it is truthy (a bound, not an expected duration)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _open_with_key(page, url: str) -> None:
    """Load the page: it finds the server wants a key, asks once, keeps it for the tab."""
    page.goto(url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#model-name:has-text('smollm2-135m-instruct')")
    assert page.evaluate("() => sessionStorage.getItem('selar.apiKey')") == KEY


def _visible(text: str) -> str:
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _replay(url: str, body: dict) -> tuple[list[dict], dict, dict]:
    """The same request over HTTP: (per-step selar objects, summary, usage)."""
    steps, summary, usage = [], None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            selar = chunk.get("selar")
            if selar and "index" in selar:
                steps.append(dict(selar, content=chunk["choices"][0]["delta"].get("content", "")))
            elif selar:
                summary = selar
            if chunk.get("usage"):
                usage = chunk["usage"]
    return steps, summary, usage


def _rows(tip, table: str) -> list[tuple[str, str, float, str]]:
    """(data-token, shown token, value, shown value) of each row of a detail table."""
    out = []
    for row in tip.query_selector_all(f"table.{table} tr"):
        cell, value = row.query_selector("td.t"), row.query_selector("td.p")
        out.append((cell.get_attribute("data-token"), cell.inner_text(), float(value.get_attribute("data-value")),
                    value.inner_text()))
    return out


def _check_rows(rows, tokens: list[str], values: list[float]) -> None:
    assert [r[0] for r in rows] == tokens
    assert [r[1] for r in rows] == [_visible(t) for t in tokens]
    assert [r[2] for r in rows] == values
    for (_, _, value, shown), expected in zip(rows, values):
        assert shown.endswith("%") and abs(float(shown[:-1]) - expected * 100) <= 0.05 + 1e-9  # 1 decimal


def _served_defaults(path) -> DecodeParams:
    """What the page starts from: the served model's defaults (its sampler, its registry tau)."""
    return model_sampler(path).apply(DecodeParams())


def test_page_is_served_without_a_key_and_fetches_nothing_from_elsewhere(server, smollm_path):
    response = httpx.get(server + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    defaults = json.loads(re.search(r'<script id="selar-defaults" type="application/json">(.*?)</script>',
                                    response.text).group(1))
    published = _served_defaults(smollm_path)
    assert published.tau != DecodeParams().tau  # SmolLM2's registry tau, not the published 0.5
    assert defaults["params"] == {k: getattr(published, k) for k in
                                  ("method", "tau", "lam", "ks", "temperature", "max_tokens", "seed")}
    for asset in re.findall(r'(?:href|src)="(/ui/[^"]+)"', response.text):
        assert httpx.get(server + asset, timeout=10).status_code == 200, asset
    # The API itself still wants the key; the page's files name no other host.
    assert httpx.get(server + "/v1/models", timeout=10).status_code == 401
    for path in (REPO / "selar_local" / "web").iterdir():
        urls = set(re.findall(r"[a-z]+://[^\s\"')]+", path.read_text(encoding="utf-8")))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # an XML namespace, never fetched


def test_streamed_answer_shows_the_traces_tokens_soft_steps_and_candidates(server, page, smollm_path):
    _open_with_key(page, server)
    # The side panel starts at the served model's defaults.
    published = _served_defaults(smollm_path)
    assert page.input_value("#method") == published.method
    assert float(page.input_value("#tau")) == published.tau and float(page.input_value("#lam")) == published.lam
    assert int(page.input_value("#ks")) == published.ks and int(page.input_value("#seed")) == published.seed
    assert float(page.input_value("#temperature")) == published.temperature
    page.fill("#max_tokens", "64")
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    # Shift+Enter is a new line, Enter sends.
    page.fill("#input", QUESTION)
    page.press("#input", "Shift+Enter")
    assert page.input_value("#input") == QUESTION + "\n" and not page.query_selector("article.msg.user")
    page.type("#input", "Answer briefly.")
    page.press("#input", "Enter")
    page.wait_for_selector("article.assistant[data-state=done]", timeout=GENERATION_TIMEOUT_MS)

    (request,) = requests
    body = request.post_data_json
    assert body["selar_trace"] is True and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": QUESTION + "\nAnswer briefly."}]
    assert (body["method"], body["tau"], body["lam"], body["ks"], body["seed"], body["max_tokens"]) == (
        "selar", published.tau, published.lam, published.ks, published.seed, 64)
    steps, summary, usage = _replay(server, body)
    assert summary["soft_steps"] > 0, "this model and seed must take a soft step for the test to mean anything"

    # Tokens rendered: one span per step that released text, in order, marked as the trace says.
    spans = page.query_selector_all("article.assistant .answer .tok")
    shown = [s for s in steps if s["content"]]
    assert [int(span.get_attribute("data-i")) for span in spans] == [s["index"] for s in shown]
    assert "".join(span.text_content() for span in spans) == "".join(s["content"] for s in steps)
    marked = [int(span.get_attribute("data-i")) for span in spans if "soft" in span.get_attribute("class").split()]
    assert marked == [s["index"] for s in shown if s["soft"]] and marked
    tints = [float(span.evaluate("e => e.style.getPropertyValue('--h')")) for span in spans]
    for tint, step in zip(tints, shown):  # written with 3 decimals
        assert abs(tint - min(1.0, step["entropy"])) <= 0.0005 + 1e-9

    # Hover: the detail shows the trace's candidates (and, on soft steps, the mixture).
    soft_step = next(s for s in shown if s["soft"])
    plain_step = next(s for s in shown if not s["soft"])
    for step in (soft_step, plain_step):
        page.hover(f"article.assistant .answer .tok[data-i='{step['index']}']")
        tip = page.wait_for_selector("#tip:not([hidden])")
        assert tip.query_selector(".head code").inner_text() == _visible(step["token_text"])
        assert tip.query_selector(".step").inner_text() == f"step {step['index']}"
        _check_rows(_rows(tip, "cands"), step["top_tokens"], step["top_probs"])
        if step["soft"]:
            _check_rows(_rows(tip, "mix"), step["mix_tokens"], step["mix_weights"])
        else:
            assert tip.query_selector("table.mix") is None
        page.mouse.move(1, 1)
        page.wait_for_selector("#tip", state="hidden")

    # Footer and the answer's own line: tokens, soft share, tokens/s.
    tokens = usage["completion_tokens"]
    assert int(page.inner_text("#stat-tokens")) == tokens == len(steps)
    assert abs(float(page.inner_text("#stat-soft").rstrip("%")) - 100 * summary["soft_steps"] / tokens) <= 0.05 + 1e-9
    assert float(page.inner_text("#stat-speed")) > 0
    meta = page.inner_text("article.assistant .meta")
    assert f"{tokens} tokens" in meta and f"{summary['soft_steps']} soft" in meta
    assert page.errors == []


def test_tau_auto_sends_auto_and_shows_the_calibrated_tau(server, page, smollm_path):
    _open_with_key(page, server)
    assert not page.is_checked("#tau-auto") and page.is_enabled("#tau")
    page.check("#tau-auto")
    assert page.is_disabled("#tau") and page.is_disabled("#tau-range")
    page.fill("#max_tokens", "8")
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    page.wait_for_selector("article.assistant[data-state=done]", timeout=GENERATION_TIMEOUT_MS)
    (request,) = requests
    assert request.post_data_json["tau"] == "auto"
    assert f"tau {CALIBRATED_TAU} (auto)" in page.inner_text("article.assistant .meta")
    # A fixed tau is shown as sent; "Reset" turns auto off again.
    page.click("#reset")
    assert not page.is_checked("#tau-auto") and page.is_enabled("#tau")
    page.click("#new-chat")
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    page.wait_for_selector("article.assistant[data-state=done]", timeout=GENERATION_TIMEOUT_MS)
    meta = page.inner_text("article.assistant .meta")
    assert f"tau {_served_defaults(smollm_path).tau}" in meta and "(auto)" not in meta
    assert page.errors == []


def test_stop_cancels_the_request_and_the_server_frees_the_slot(server, page):
    before = httpx.get(server + "/health", headers=AUTH, timeout=10).json()
    _open_with_key(page, server)
    page.fill("#max_tokens", "900")
    page.fill("#input", "Write a long story about a lighthouse keeper.")
    page.click("#send")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_selector("article.assistant .answer .tok")  # tokens are arriving
    page.click("#stop")
    page.wait_for_selector("article.assistant[data-state=stopped]")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert "stopped" in page.inner_text("article.assistant .meta")
    # The server notices the disconnect and cancels before its next step.
    health = lambda: httpx.get(server + "/health", headers=AUTH, timeout=10).json()  # noqa: E731
    _until(lambda: (h := health())["slots_busy"] == 0 and h["cancelled"] == before["cancelled"] + 1,
           "the server to cancel the stopped request")
    # The slot is free: the next message is answered, with the conversation so far.
    stopped_text = page.text_content("article.assistant .answer")
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#max_tokens", "8")
    page.fill("#input", "Say hello.")
    page.press("#input", "Enter")
    page.wait_for_selector("article.assistant:nth-of-type(4)[data-state=done]", timeout=GENERATION_TIMEOUT_MS)
    (request,) = requests
    assert request.post_data_json["messages"] == [
        {"role": "user", "content": "Write a long story about a lighthouse keeper."},
        {"role": "assistant", "content": stopped_text}, {"role": "user", "content": "Say hello."}]
    assert page.errors == []


def _step(index: int, text: str, soft: bool = False) -> dict:
    step = {"index": index, "token": index, "token_text": text, "soft": soft, "entropy": 0.5,
            "top_ids": [index], "top_tokens": [text], "top_probs": [1.0]}
    if soft:
        step.update(mix_ids=[index], mix_tokens=[text], mix_weights=[1.0])
    return step


def _chunk(step: dict, field: str = "content") -> dict:
    return {"choices": [{"index": 0, "delta": {field: step["token_text"]}, "finish_reason": None}], "selar": step}


def test_thinking_span_folds_from_tags_or_reasoning_content(server, page):
    """The models under test do not think, so these chunks are written out: the shapes a
    thinking model streams (<think> tokens in content, or the reasoning_content field)."""
    _open_with_key(page, server)
    tagged = ["<think>", "Let", " me", " see", "</think>", "The", " answer"]
    content = page.evaluate("chunks => window.selarChat.render(chunks)",
                            [_chunk(_step(i, t, soft=i == 2)) for i, t in enumerate(tagged)])
    assert content == "The answer"
    view = page.query_selector_all("article.assistant")[-1]
    thinking = view.query_selector("details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is not None
    assert thinking.query_selector(".body").inner_text() == "Let me see"
    assert thinking.query_selector(".body .tok.soft").inner_text() == " me"
    assert "3 tokens, 1 soft" in thinking.query_selector("summary").inner_text()
    assert view.query_selector(".answer").inner_text() == "The answer"
    thinking.query_selector("summary").click()  # folds
    assert thinking.get_attribute("open") is None and not thinking.query_selector(".body").is_visible()

    # The template opened <think> in the prompt: only the closing tag is generated.
    opened = ["Hmm", ".", "</think>", "Yes", "."]
    assert page.evaluate("chunks => window.selarChat.render(chunks)",
                         [_chunk(_step(i, t)) for i, t in enumerate(opened)]) == "Yes."
    view = page.query_selector_all("article.assistant")[-1]
    assert view.query_selector("details.thinking .body").inner_text() == "Hmm."

    # A server that separates reasoning: delta.reasoning_content.
    chunks = [_chunk(_step(0, "Think", soft=True), "reasoning_content"), _chunk(_step(1, "ing"), "reasoning_content"),
              _chunk(_step(2, "Done"))]
    assert page.evaluate("chunks => window.selarChat.render(chunks)", chunks) == "Done"
    view = page.query_selector_all("article.assistant")[-1]
    assert view.query_selector("details.thinking .body").inner_text() == "Thinking"
    assert view.query_selector(".answer").inner_text() == "Done"
    assert page.errors == []


def test_dark_mode_and_a_narrow_window(server, browser):
    context = browser.new_context(viewport={"width": 390, "height": 780}, color_scheme="dark", is_mobile=True,
                                  has_touch=True)
    try:
        page = context.new_page()
        errors = _collect_errors(page)
        page.goto(server + "/")
        page.wait_for_selector("#key-dialog[open]")
        assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
        page.click("#key-cancel")
        background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert _luminance(background) < 0.1
        # The side panel waits off-screen until asked for.
        box = page.query_selector("#panel").bounding_box()
        assert box["x"] >= 390
        panel = page.query_selector("#panel")
        page.click("#panel-toggle")
        _until(lambda: panel.bounding_box()["x"] + panel.bounding_box()["width"] <= 390, "the panel to open")
        assert page.is_visible("#tau")
        page.click("#messages", position={"x": 10, "y": 40})  # a tap elsewhere closes it
        _until(lambda: panel.bounding_box()["x"] >= 390, "the panel to close")
        # The toggle switches to light and is remembered.
        page.click("#theme-toggle")
        assert page.evaluate("() => document.documentElement.dataset.theme") == "light"
        assert _luminance(page.evaluate("() => getComputedStyle(document.body).backgroundColor")) > 0.8
        # Nothing overflows sideways.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        assert errors == []
    finally:
        context.close()


def _luminance(css_color: str) -> float:
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css_color)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_a_repeat_after_a_soft_step_is_shown_as_part_of_it(server, page):
    """A soft step shows its sampled token but feeds a mixture pushed away from it, so the next
    token may repeat it: the page keeps the repeat and marks it as the soft step's, and a
    repeat after a discrete step stays an ordinary token."""
    _open_with_key(page, server)
    steps = [_step(0, "The"), _step(1, " has", soft=True), _step(2, " has"), _step(3, " 5"), _step(4, " 5")]
    steps[2]["token"] = steps[1]["token"]  # the same token id as the soft step's
    steps[4]["token"] = steps[3]["token"]  # a repeat after a discrete step
    content = page.evaluate("chunks => window.selarChat.render(chunks)", [_chunk(s) for s in steps])
    assert content == "The has has 5 5"  # nothing hidden
    view = page.query_selector_all("article.assistant")[-1]
    spans = view.query_selector_all(".answer .tok")
    classes = [set(span.get_attribute("class").split()) for span in spans]
    assert classes == [{"tok"}, {"tok", "soft"}, {"tok", "soft-repeat"}, {"tok"}, {"tok"}]
    spans[2].hover()
    assert "repeat after a soft step" in page.inner_text("#tip")


def test_latent_steps_are_markers_with_their_top_tokens(server, page):
    """A step carrying latent markers (method latent's first token): one marker per latent
    step before the token, none of them in the content, each tip naming its top tokens."""
    _open_with_key(page, server)
    first = _step(0, "Twelve")
    first["latent"] = [{"latent": True, "step": k, "entropy": 0.25, "top_ids": [7, 8],
                        "top_tokens": [f" idea{k}", " other"], "top_probs": [0.75, 0.25]} for k in range(3)]
    steps = [first, _step(1, " plus")]
    content = page.evaluate("chunks => window.selarChat.render(chunks, 'latent')", [_chunk(s) for s in steps])
    assert content == "Twelve plus"
    view = page.query_selector_all("article.assistant")[-1]
    spans = view.query_selector_all(".answer .tok")
    assert [set(s.get_attribute("class").split()) for s in spans] == [{"tok", "latent"}] * 3 + [{"tok"}] * 2
    spans[1].hover()
    tip = page.inner_text("#tip")
    assert "latent step 1" in tip and "no token" in tip and _visible(" idea1") in tip
