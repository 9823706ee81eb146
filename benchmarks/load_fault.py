"""Load and fault script for `selar serve` (a benchmark, not a test): starts a real server on
a free loopback port and checks, one scenario per row, that one client cannot hurt another.

    python benchmarks/load_fault.py                      # SmolLM2-135M, --parallel 4 --queue-size 4
    python benchmarks/load_fault.py --markdown docs/benchmarks/reliability.md

Rows: a burst of 32 streaming clients over 4 slots and a queue of 4 (only 200 and 503;
every 200 ends with `data: [DONE]`); 8 clients that disconnect mid-stream (slots and KV
cells free afterwards); malformed bodies and bad values (each a 400 in OpenAI's error shape);
an expensive-parameter request beside a normal one (the normal one's latency against alone
and against a normal neighbour); `kill -9` of the server mid-request, then a restart.
Models on demand (`selar serve --models A,B`): 8 clients alternating between two models
under --max-loaded 1 (every request answered 200 or 503, none lost, RSS bounded, no KV
cells left); a loaded model's latency while another one loads (--max-loaded 2); a model
file deleted, then one corrupted, while the server runs (a clear error for that model,
the other keeps serving). `--only-models` runs just those rows.
Every request loop is bounded in count and time, and only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 17 * 23? Answer briefly."}]


@dataclass
class Row:
    scenario: str
    expectation: str
    observed: str
    ok: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`selar serve` in a subprocess on 127.0.0.1."""

    def __init__(self, model: str | None, port: int, parallel: int, queue_size: int, n_ctx: int,
                 threads: int | None, extra: tuple[str, ...] = ()):
        """model None: models on demand (`extra` names them: --models, --models-dir)."""
        self.cmd = [sys.executable, "-m", "selar_local.cli", "serve", *(["--model", model] if model else []),
                    "--port", str(port), "--parallel", str(parallel), "--queue-size", str(queue_size),
                    "--n-ctx", str(n_ctx), "--log-level", "warning", *extra]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"selar serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for(self, condition, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise RuntimeError(f"state not reached: {health}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stream_request(url: str, body: dict, *, read_chunks: int | None = None, timeout: float = 600) -> dict:
    """One streaming chat request: status, content chunks, whether it ended with [DONE]."""
    out = {"status": None, "chunks": 0, "done": False, "error": None}
    try:
        with httpx.Client(timeout=timeout) as http:
            with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
                out["status"] = response.status_code
                if response.status_code != 200:
                    response.read()
                    return out
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                    elif line.startswith("data: "):
                        out["chunks"] += 1
                        if read_chunks is not None and out["chunks"] >= read_chunks:
                            return out  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    return out


def latency(url: str, body: dict) -> float:
    started = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- scenarios


def burst(server: Server, clients: int, slots: int, queue: int) -> Row:
    body = {"messages": QUESTION, "max_tokens": 32, "seed": 1}
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: stream_request(server.url, body), range(clients)))
    statuses = [r["status"] for r in results]
    ok_200 = [r for r in results if r["status"] == 200]
    n503 = statuses.count(503)
    others = [s for s in statuses if s not in (200, 503)]
    all_done = all(r["done"] for r in ok_200)
    health = server.wait_for(lambda h: h["slots_busy"] == 0 and h["queued"] == 0)
    ok = not others and all_done and len(ok_200) >= slots + queue and health["slots_busy_peak"] <= slots
    return Row(f"{clients} streaming clients at once, {slots} slots + queue {queue}",
               "only 200 and 503; every 200 ends with [DONE]; never more than --parallel decoding",
               f"{len(ok_200)} x 200 (all with [DONE]: {all_done}), {n503} x 503, other: {others or 'none'}; "
               f"peak busy {health['slots_busy_peak']}", ok)


def disconnects(server: Server, clients: int) -> Row:
    before = server.health()
    body = {"messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
            "ignore_eos": True, "method": "selar", "seed": 2}
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: stream_request(server.url, body, read_chunks=3), range(clients)))
    after = server.wait_for(lambda h: h["slots_busy"] == 0 and h["queued"] == 0 and h["kv_cells_in_use"] == 0)
    cancelled = after["cancelled"] - before["cancelled"]
    completed = after["completed"] - before["completed"]
    statuses = sorted({r["status"] for r in results})
    ok = statuses == [200] and cancelled == clients and completed == 0
    return Row(f"{clients} clients disconnect mid-stream (each after 3 chunks)",
               "each cancelled; afterwards 0 busy, 0 queued, 0 KV cells in use",
               f"statuses {statuses}; cancelled {cancelled}, completed {completed}; then busy {after['slots_busy']}, "
               f"queued {after['queued']}, KV cells {after['kv_cells_in_use']}", ok)


MALFORMED = [
    ("not JSON", b"{oops", "invalid_json"),
    ("a JSON array", b"[1, 2]", "invalid_json"),
    ("empty body", b"", "invalid_json"),
    ("messages not a list", {"messages": "hi"}, None),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("typo in a parameter", {"messages": QUESTION, "taus": 0.5}, "unknown_parameter"),
    ("tau a string", {"messages": QUESTION, "tau": "high"}, "invalid_value"),
    ("ks = 49152", {"messages": QUESTION, "ks": 49152}, "invalid_value"),
    ("soft_topk = 1000", {"messages": QUESTION, "method": "soft", "soft_topk": 1000}, "invalid_value"),
    ("40 stop strings", {"messages": QUESTION, "stop": [f"s{i}" for i in range(40)]}, "invalid_value"),
    ("2,000 messages", {"messages": QUESTION * 2000}, "too_many_messages"),
    ("n = 9 (> slots)", {"messages": QUESTION, "n": 9}, "invalid_value"),
    ("top_logprobs = 50", {"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, None),
    ("prompt over the context", {"messages": [{"role": "user", "content": "hi " * 5000}]},
     "context_length_exceeded"),
    ("temperature = 9", {"messages": QUESTION, "temperature": 9}, None),
]


def malformed(server: Server) -> Row:
    bad = []
    for name, content, code in MALFORMED:
        kwargs = {"json": content} if isinstance(content, dict) else {"content": content}
        response = httpx.post(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                              timeout=60, **kwargs)
        try:
            error = response.json()["error"]
            shaped = set(error) == {"message", "type", "param", "code"} and bool(error["message"])
        except (ValueError, KeyError, TypeError):
            error, shaped = {}, False
        if response.status_code != 400 or not shaped or (code is not None and error.get("code") != code):
            bad.append(f"{name}: {response.status_code} {error.get('code')}")
    # A body over the limit, sent in chunks with no Content-Length: refused while it streams in.
    def chunks():
        piece = b" " * (1 << 20)
        for _ in range(20):
            yield piece
    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    if response.status_code != 413:
        bad.append(f"20 MB chunked body: {response.status_code}")
    return Row(f"{len(MALFORMED)} malformed bodies and bad values, and a 20 MB chunked body",
               "each a 400 with the OpenAI error shape and its code; the oversized body a 413",
               "all as expected" if not bad else "; ".join(bad), not bad)


def expensive_neighbour(server: Server, reps: int) -> tuple[Row, dict]:
    normal = {"messages": QUESTION, "max_tokens": 32, "seed": 3, "ignore_eos": True, "method": "selar"}
    # The neighbour outlasts the measured request (150 tokens against 32) and starts first.
    expensive = {"messages": [{"role": "user", "content": "Write a long essay."}], "ignore_eos": True,
                 "max_tokens": 150,
                 "method": "selar", "top_k": 0, "top_p": 1.0, "temperature": 1.0, "tau": 0, "ks": 64,
                 "soft_topk": 64, "seed": 4}
    cheap = {**expensive, "top_k": 20, "top_p": 0.95, "ks": 3, "soft_topk": 10, "tau": 0.5}
    latency(server.url, normal)  # warm-up
    figures: dict[str, list[float]] = {"alone": [], "beside a normal request": [], "beside the expensive request": []}
    for _ in range(reps):  # interleaved, so drift on a shared machine hits all three alike
        figures["alone"].append(latency(server.url, normal))
        for label, neighbour in (("beside a normal request", cheap), ("beside the expensive request", expensive)):
            thread = threading.Thread(target=lambda: stream_request(server.url, neighbour), daemon=True)
            thread.start()
            server.wait_for(lambda h: h["slots_busy"] >= 1)
            figures[label].append(latency(server.url, normal))
            thread.join(600)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    ratio = medians["beside the expensive request"] / medians["alone"]
    control = medians["beside a normal request"] / medians["alone"]
    # Judged against a normal neighbour: on a CPU a batched decode of two sequences costs up to
    # twice one (compute-bound), so ANY neighbour slows a request; what must not happen is an
    # expensive neighbour costing more than a normal one. Both ratios to alone are printed.
    against_normal = medians["beside the expensive request"] / medians["beside a normal request"]
    row = Row("a 32-token request beside top_k=0, top_p=1, ks=64, soft_topk=64, tau=0",
              "its latency within 1.5x of the same request beside a normal neighbour",
              f"median {medians['alone']:.2f} s alone, {medians['beside a normal request']:.2f} s beside a normal "
              f"request ({control:.2f}x alone), {medians['beside the expensive request']:.2f} s beside the expensive "
              f"one ({ratio:.2f}x alone, {against_normal:.2f}x beside normal); {reps} interleaved repetitions",
              against_normal <= 1.5)
    return row, figures


def kill_and_restart(server: Server) -> Row:
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "ignore_eos": True, "seed": 5}
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(stream_request(server.url, body, timeout=60)))
    thread.start()
    server.wait_for(lambda h: h["slots_busy"] == 1)
    killed_at = time.monotonic()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    thread.join(120)
    client_seconds = time.monotonic() - killed_at
    client_ended = not thread.is_alive()
    restart_seconds = server.start()
    after = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8},
                       timeout=120)
    health = server.health()
    ok = client_ended and not result.get("done") and after.status_code == 200 and health["slots_busy"] == 0
    return Row("kill -9 of the server mid-stream, then a restart",
               "the client's stream ends with an error (no hang); the restarted server serves at once",
               f"client saw {result.get('error') or 'an unterminated stream'} after {client_seconds:.2f} s "
               f"(no [DONE]); restart healthy in {restart_seconds:.1f} s; next request {after.status_code}", ok)


# ------------------------------------------------------------------------- models on demand


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chat(url: str, model: str, max_tokens: int = 8, timeout: float = 600) -> int | str:
    try:
        return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": QUESTION,
                                                               "max_tokens": max_tokens}, timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def alternating_models(models: tuple[str, str], clients: int, per_client: int, n_ctx: int,
                       threads: int | None) -> tuple[Row, dict]:
    """`clients` threads, each sending `per_client` requests alternating between two models,
    on a server that keeps one loaded (--parallel 2 --queue-size 8)."""
    server = Server(None, free_port(), 2, 8, n_ctx, threads, ("--models", ",".join(models), "--max-loaded", "1"))
    server.start()
    samples: list[tuple[float, int]] = []  # (RSS MiB, models loaded)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            health = server.health()
            samples.append((rss_mib(server.proc.pid), len(health["models_loaded"])))
            time.sleep(0.1)

    try:
        one_loaded = {}
        for model in models:  # the RSS of each model alone, loaded by a first request
            chat(server.url, model)
            one_loaded[model] = rss_mib(server.proc.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda i: [chat(server.url, models[(i + k) % 2]) for k in range(per_client)],
                                     range(clients)))
        seconds = time.monotonic() - started
        stop.set()
        sampler.join()
        health = server.wait_for(lambda h: h["slots_busy"] == 0 and h["queued"] == 0)
        loads = {m["id"]: m["meta"]["loads"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
        (last_model,) = health["models_loaded"]
        rss_end = rss_mib(server.proc.pid)
    finally:
        stop.set()
        server.stop()
    flat = [s for per in statuses for s in per]
    counts = {code: flat.count(code) for code in sorted(set(flat), key=str)}
    lost = sum(n for code, n in counts.items() if code not in (200, 503))
    peak_rss = max(r for r, _ in samples)
    most_loaded = max(n for _, n in samples)
    # Bounded: a load's transient (file pages and repacked copies) at most 1.5x the larger
    # model alone, and nothing accumulating over the switches (idle afterwards: within 1.15x
    # of the larger model alone, whichever is loaded).
    largest = max(one_loaded.values())
    growth = rss_end / one_loaded[last_model]
    ok = lost == 0 and counts.get(200, 0) > 0 and health["kv_cells_in_use"] == 0 and most_loaded <= 1 \
        and peak_rss <= 1.5 * largest and rss_end <= 1.15 * largest
    row = Row(f"{clients} clients alternating {models[0]} / {models[1]}, --max-loaded 1, {per_client} requests each",
              "every request 200 or 503, none lost; never 2 models loaded; RSS peak within 1.5x of the larger "
              "model alone, and within 1.15x of it after the switches; no KV cells left",
              f"{len(flat)} requests in {seconds:.0f} s: {', '.join(f'{n} x {c}' for c, n in counts.items())}; "
              f"lost {lost}; most loaded at once {most_loaded}; loads {loads}; RSS peak {peak_rss:.0f} MiB "
              f"(alone: {', '.join(f'{m} {r:.0f} MiB' for m, r in one_loaded.items())}); after: {last_model} "
              f"loaded, {rss_end:.0f} MiB ({growth:.2f}x alone); KV cells after {health['kv_cells_in_use']}", ok)
    return row, {"statuses": counts, "rss_peak_mib": peak_rss, "rss_alone_mib": one_loaded, "loads": loads,
                 "rss_end_mib": rss_end,
                 "seconds": seconds}


def load_beside_serving(models: tuple[str, str], n_ctx: int, threads: int | None, reps: int) -> tuple[Row, dict]:
    """--max-loaded 2: the latency of requests for a loaded model while the other one loads,
    against the same requests with nothing loading."""
    server = Server(None, free_port(), 1, 8, n_ctx, threads, ("--models", ",".join(models), "--max-loaded", "2",
                                                              "--keep-alive", "-1"))
    server.start()
    try:
        chat(server.url, models[0])
        idle = []
        for _ in range(reps):
            started = time.perf_counter()
            assert chat(server.url, models[0]) == 200
            idle.append(time.perf_counter() - started)
        loader = threading.Thread(target=lambda: chat(server.url, models[1], max_tokens=1))
        load_started = time.perf_counter()
        loader.start()
        during = []
        while loader.is_alive() and len(during) < 100:
            started = time.perf_counter()
            assert chat(server.url, models[0]) == 200
            if loader.is_alive():
                during.append(time.perf_counter() - started)
        loader.join()
        load_seconds = time.perf_counter() - load_started
    finally:
        server.stop()
    idle_median = statistics.median(idle)
    during_median = statistics.median(during) if during else float("nan")
    ok = bool(during)  # requests completed while the other model loaded: not blocked by it
    row = Row(f"requests for {models[0]} while {models[1]} loads (--max-loaded 2)",
              "served during the load (not queued behind it); latency measured against idle",
              f"{len(during)} requests completed during the {load_seconds:.1f} s load: median {during_median:.2f} s "
              f"against {idle_median:.2f} s with nothing loading ({during_median / idle_median:.2f}x; the load's "
              f"self-check and weight repacking share the CPUs)", ok)
    return row, {"idle_seconds": idle, "during_load_seconds": during, "load_seconds": load_seconds}


def model_file_damage(models: tuple[str, str], n_ctx: int, threads: int | None) -> Row:
    """A served model file deleted, then another corrupted, while the server runs."""
    import shutil
    import tempfile

    from selar_local.registry import get_entry, local_path

    paths = [local_path(get_entry(m)) for m in models]
    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        shutil.copy(paths[0], folder_path / "deleted.gguf")
        shutil.copy(paths[0], folder_path / "corrupted.gguf")
        (folder_path / "healthy.gguf").symlink_to(paths[1])
        server = Server(None, free_port(), 1, 8, n_ctx, threads, ("--models-dir", folder, "--max-loaded", "2"))
        server.start()
        try:
            ids = {Path(m["meta"]["path"]).stem: m["id"]
                   for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
            (folder_path / "deleted.gguf").unlink()
            (folder_path / "corrupted.gguf").write_bytes(b"GGUF" + os.urandom(4096))
            answers = {}
            for name in ("deleted", "corrupted", "healthy"):
                response = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
                    "model": ids[name], "messages": QUESTION, "max_tokens": 8})
                answers[name] = (response.status_code, response.json().get("error", {}).get("message", ""))
            again = chat(server.url, ids["healthy"])
        finally:
            server.stop()
    ok = (answers["deleted"][0] == answers["corrupted"][0] == 500 and "does not exist" in answers["deleted"][1]
          and answers["healthy"][0] == 200 and again == 200)
    return Row("a model file deleted, another corrupted, while the server runs",
               "a clear error naming each broken model (500 model_load_failed); the other model keeps serving",
               f"deleted: {answers['deleted'][0]} \"{answers['deleted'][1][:150]}\"; corrupted: {answers['corrupted'][0]} "
               f"\"{answers['corrupted'][1][:150]}\"; healthy model: {answers['healthy'][0]}, then {again}", ok)


def model_rows(args) -> tuple[list[Row], dict]:
    models = (args.model, args.second_model)
    rows, raw = [], {}
    row, raw["alternating"] = alternating_models(models, 8, args.switch_requests, args.n_ctx, args.threads)
    rows.append(row)
    print(f"[{'ok' if row.ok else 'FAIL'}] {row.scenario}: {row.observed}", flush=True)
    row, raw["load_beside_serving"] = load_beside_serving(models, args.n_ctx, args.threads, args.reps)
    rows.append(row)
    print(f"[{'ok' if row.ok else 'FAIL'}] {row.scenario}: {row.observed}", flush=True)
    rows.append(model_file_damage(models, args.n_ctx, args.threads))
    print(f"[{'ok' if rows[-1].ok else 'FAIL'}] {rows[-1].scenario}: {rows[-1].observed}", flush=True)
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--disconnects", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--second-model", default="gemma3-270m", help="the other model of the model rows")
    parser.add_argument("--switch-requests", type=int, default=4, help="requests per client alternating models")
    parser.add_argument("--only-models", action="store_true", help="only the models-on-demand rows")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="raw figures")
    args = parser.parse_args(argv)

    server = Server(args.model, free_port(), args.parallel, args.queue_size, args.n_ctx, args.threads)
    rows: list[Row] = []
    raw: dict = {}
    try:
        if args.only_models:
            rows, raw = model_rows(args)
            return _report(args, rows, raw)
        print(f"starting selar serve on {server.url} ...", flush=True)
        server.start()
        for scenario in (lambda: burst(server, args.clients, args.parallel, args.queue_size),
                         lambda: disconnects(server, args.disconnects),
                         lambda: malformed(server)):
            rows.append(scenario())
            print(f"[{'ok' if rows[-1].ok else 'FAIL'}] {rows[-1].scenario}: {rows[-1].observed}", flush=True)
        row, raw["latency_seconds"] = expensive_neighbour(server, args.reps)
        rows.append(row)
        print(f"[{'ok' if row.ok else 'FAIL'}] {row.scenario}: {row.observed}", flush=True)
        rows.append(kill_and_restart(server))
        print(f"[{'ok' if rows[-1].ok else 'FAIL'}] {rows[-1].scenario}: {rows[-1].observed}", flush=True)
    finally:
        server.stop()
    more, raw["models"] = model_rows(args)
    return _report(args, rows + more, raw)


def _report(args, rows: list[Row], raw: dict) -> int:
    table = ["| scenario | expected | observed | ok |", "|---|---|---|---|"]
    table += [f"| {r.scenario} | {r.expectation} | {r.observed} | {'yes' if r.ok else '**no**'} |" for r in rows]
    settings = (f"model {args.model}, --parallel {args.parallel}, --queue-size {args.queue_size}, "
                f"--n-ctx {args.n_ctx}, {os.cpu_count()} CPUs")
    text = f"Settings: {settings}.\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": [r.__dict__ for r in rows], **raw}, indent=1))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
