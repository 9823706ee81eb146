"""`selar serve` in a subprocess on a free loopback port, for the tests that need a real
server: started, waited for (its /health answers, with a generous bound), stopped."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, *, proc: subprocess.Popen | None = None, headers: dict | None = None,
                  timeout: float = 120.0) -> None:
    """Until GET /health answers 200 (or the process exits: its stderr is the error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"selar serve exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", headers=headers or {}, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


@contextlib.contextmanager
def running_server(model_path, *args: str, api_key: str | None = None, env: dict | None = None) -> Iterator[str]:
    """`selar serve --model MODEL_PATH ARGS...` on 127.0.0.1 (with `env` added to the
    environment): yields its base URL. model_path None: no --model (models on demand)."""
    with running_server_process(model_path, *args, api_key=api_key, env=env) as (url, _proc):
        yield url


@contextlib.contextmanager
def running_server_process(model_path, *args: str, api_key: str | None = None,
                           env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """As running_server, yielding (base URL, the server's process)."""
    port = free_port()
    model = [] if model_path is None else ["--model", str(model_path)]
    cmd = [sys.executable, "-m", "selar_local.cli", "serve", *model, "--port", str(port),
           "--log-level", "warning", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc=proc, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
