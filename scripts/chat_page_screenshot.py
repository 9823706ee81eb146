"""Screenshot of the chat page mid-answer (docs/chat-page.png in the README).

Starts `selar serve` on a free loopback port, opens the page in headless Chromium
(Debian's `chromium`, driven by Playwright), sends a question, waits until the answer
has `--after` tokens, opens the detail of a soft step and takes the picture while the
answer is still streaming.

    .venv/bin/python scripts/chat_page_screenshot.py --model qwen2.5-coder-0.5b-instruct
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or .gguf path (default: the embedded model)")
    parser.add_argument("--prompt", default="A train travels 60 km in 45 minutes. What is its average speed "
                                            "in km/h? Think step by step.")
    parser.add_argument("--after", type=int, default=70, help="tokens of the answer before the picture")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--theme", choices=("light", "dark"), default="light")
    parser.add_argument("--threads", type=int, default=1, help="decode threads (few: the answer streams slower)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "chat-page.png")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "selar_local.cli", "serve", "--port", str(port), "--threads", str(args.threads),
           "--log-level", "warning"] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"selar serve exited: {server.stderr.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit("selar serve did not come up")
            time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height},
                                    color_scheme=args.theme, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector("#model-name:not(:empty)")
            page.fill("#input", args.prompt)
            page.press("#input", "Enter")
            page.wait_for_selector(f"article.assistant .answer > .tok:nth-child({args.after})", timeout=300_000)
            soft = page.query_selector_all("article.assistant .answer .tok.soft")
            if soft:  # a soft step in the middle of what is shown
                soft[len(soft) // 2].click()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            state = page.get_attribute("article.assistant", "data-state")
            browser.close()
        print(f"wrote {args.out} (answer state when taken: {state})")
        return 0 if state == "streaming" else 1
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    sys.exit(main())
