"""Measure a model split over llama.cpp RPC servers on loopback (docs/DISTRIBUTED.md).

Starts `selar rpc-server`s on 127.0.0.1, then prints
- network traffic: bytes each way per decode step (token inputs, soft inputs, mixed), counted
  by a byte-counting TCP relay between the client and each server, and the bytes of the load;
- speed: decode tokens/s of the local run and of the split run (direct, without the relay);
- how far the local run's logits are from the split run's (CPU repacking, see the doc).

    python scripts/measure_rpc.py [--model qwen2.5-coder-0.5b-instruct] [--servers 2] [--steps 64]
"""
from __future__ import annotations

import argparse
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from selar_local.params import DecodeParams
from selar_local.registry import resolve_model
from selar_local.rpc import Endpoint, handshake
from selar_local.runtime import Runtime

PROMPT = [{"role": "user", "content": "A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep are left? "
                                      "Think step by step."}]


class CountingRelay:
    """Forwards one port to another, counting bytes client->server and server->client."""

    def __init__(self, target: Endpoint):
        self.target = target
        self.sent = self.received = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = Endpoint("127.0.0.1", self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.target.host, self.target.port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "received"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counter: str) -> None:
        try:
            while chunk := source.recv(1 << 20):
                sink.sendall(chunk)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(chunk))
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received


def start_servers(n: int, threads: int) -> list[tuple[subprocess.Popen, Endpoint]]:
    servers = []
    for _ in range(n):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "selar_local.cli", "rpc-server", "--port", str(port),
                                 "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append((proc, Endpoint("127.0.0.1", port)))
    for proc, endpoint in servers:
        deadline = time.monotonic() + 120
        while True:
            try:
                handshake(endpoint, timeout=5)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"rpc-server on {endpoint} did not start")
                time.sleep(0.05)
    return servers


def traffic_per_step(rt: Runtime, relays: list[CountingRelay], params: DecodeParams, steps: int) -> dict:
    """Marginal bytes per decode step: (run of 2N steps - run of N steps) / N, so the
    prompt's prefill and the fixed costs cancel."""
    def run(n: int):
        before = [r.totals() for r in relays]
        result = rt.generate(messages=PROMPT, params=dataclasses.replace(params, max_tokens=n))
        after = [r.totals() for r in relays]
        sent = sum(a[0] - b[0] for a, b in zip(after, before))
        received = sum(a[1] - b[1] for a, b in zip(after, before))
        return sent, received, result

    s1, r1, short = run(steps)
    s2, r2, long = run(2 * steps)
    n = long.completion_tokens - short.completion_tokens
    return {"sent": (s2 - s1) / n, "received": (r2 - r1) / n, "soft_share": long.soft_share, "steps": n}


def local_layers(path: Path) -> int:
    from selar_local.engine import LlamaModel

    model = LlamaModel(path, vocab_only=True)
    try:
        return int(model.metadata(f"{model.architecture}.block_count"))
    finally:
        model.close()


def decode_speed(rt: Runtime, params: DecodeParams, steps: int) -> float:
    rt.generate(messages=PROMPT, params=dataclasses.replace(params, max_tokens=4))  # warm
    result = rt.generate(messages=PROMPT, params=dataclasses.replace(params, max_tokens=steps))
    return result.completion_tokens / result.decode_seconds


def logit_gap(a: Runtime, b: Runtime, steps: int) -> tuple[float, int]:
    """Teacher-forced: feed a's greedy tokens to both; max |logit difference| and how many
    steps have a different argmax."""
    tokens = a.encode(messages=PROMPT)
    tokens += a.generate(messages=PROMPT, params=DecodeParams(method="cot", greedy=True, max_tokens=steps)).tokens
    worst, flips = 0.0, 0
    outputs = []
    for rt in (a, b):
        ctx = rt.context
        ctx.remove_sequence(0)
        rows = []
        for start in range(0, len(tokens), ctx.n_batch):
            chunk = tokens[start:start + ctx.n_batch]
            ctx.decode_tokens(chunk, range(start, start + len(chunk)), [0] * len(chunk), [True] * len(chunk))
            rows.extend(ctx.logits(i).copy() for i in range(len(chunk)))
        ctx.remove_sequence(0)
        outputs.append(np.array(rows[-steps:]))
    worst = float(np.max(np.abs(outputs[0] - outputs[1])))
    flips = int(np.sum(outputs[0].argmax(axis=1) != outputs[1].argmax(axis=1)))
    return worst, flips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads of the client and of each server")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    path = Path(resolve_model(args.model))
    servers = start_servers(args.servers, args.threads)
    try:
        relays = [CountingRelay(endpoint) for _, endpoint in servers]
        before = sum(sum(r.totals()) for r in relays)
        started = time.perf_counter()
        relayed = Runtime(path, n_ctx=1024, n_threads=args.threads, rpc=[str(r.endpoint) for r in relays])
        load_s = time.perf_counter() - started
        load_sent = sum(r.totals()[0] for r in relays) - before
        print(f"model {path.name}; {args.servers} rpc-server(s) on loopback, {args.threads} thread(s) each; "
              f"load: {load_sent / 2**20:.1f} MiB sent to the servers in {load_s:.1f} s")
        print("\n| decode steps | soft share | sent per step (B) | received per step (B) |\n|---|---|---|---|")
        for label, params in (("cot (token inputs)", DecodeParams(method="cot", greedy=True)),
                              ("soft (tau=0: every input soft)", DecodeParams(method="selar", greedy=True, tau=0.0)),
                              ("selar (published defaults)", DecodeParams(method="selar", greedy=True))):
            t = traffic_per_step(relayed, relays, params, args.steps)
            print(f"| {label} | {100 * t['soft_share']:.0f}% | {t['sent']:.0f} | {t['received']:.0f} |")
        relayed.close()
        # One layer fewer offloaded: llama.cpp offloads the last N of the n_layer + 1
        # "layers" (the output layer counts as the last), so layer 0 stays here but the
        # output layer, and with it the logits, stays on the last server.
        n_layer = int(local_layers(path))
        relayed = Runtime(path, n_ctx=1024, n_threads=args.threads, n_gpu_layers=n_layer,
                          rpc=[str(r.endpoint) for r in relays])
        for label, params in ((f"cot, --n-gpu-layers {n_layer} (layer 0 local)", DecodeParams(method="cot", greedy=True)),
                              (f"selar, --n-gpu-layers {n_layer}", DecodeParams(method="selar", greedy=True))):
            t = traffic_per_step(relayed, relays, params, args.steps)
            print(f"| {label} | {100 * t['soft_share']:.0f}% | {t['sent']:.0f} | {t['received']:.0f} |")
        relayed.close()

        local = Runtime(path, n_ctx=1024, n_threads=args.threads)
        plain = Runtime(path, n_ctx=1024, n_threads=args.threads, cpu_repack=False)
        split = Runtime(path, n_ctx=1024, n_threads=args.threads, rpc=[str(e) for _, e in servers])
        split_out = Runtime(path, n_ctx=1024, n_threads=args.threads, n_gpu_layers=n_layer,
                            rpc=[str(e) for _, e in servers])
        print("\n| run | cot tokens/s | selar tokens/s |\n|---|---|---|")
        for label, rt in (("local", local), ("local, cpu_repack=False", plain), (f"split over {args.servers} servers", split),
                          (f"split over {args.servers} servers, --n-gpu-layers {n_layer}", split_out)):
            cot = decode_speed(rt, DecodeParams(method="cot", greedy=True), args.steps)
            selar = decode_speed(rt, DecodeParams(method="selar", greedy=True), args.steps)
            print(f"| {label} | {cot:.1f} | {selar:.1f} |")
        for label, other in (("local (repacked)", local), ("local, cpu_repack=False", plain)):
            worst, flips = logit_gap(split, other, args.steps)
            print(f"\nsplit vs {label}: max |logit diff| over {args.steps} teacher-forced steps = {worst:.4g}, "
                  f"argmax differs at {flips} step(s)")
        for rt in (local, plain, split, split_out):
            rt.close()
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
