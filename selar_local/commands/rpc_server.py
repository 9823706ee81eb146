"""`selar rpc-server`: lend this machine's CPU or GPU to a model split over several
machines. It runs llama.cpp's own RPC server (the one `llama-server --rpc` talks to) from
the llama.cpp build selar-local uses, so client and server speak the same protocol."""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
import time

from selar_local.rpc import DEFAULT_PORT

READY_TIMEOUT_S = 120.0  # how long the server may take to listen (device start-up)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rpc-server", help="lend this machine's CPU/GPU to a model split over machines (llama.cpp RPC)",
        description="Serve this machine's devices over llama.cpp's RPC protocol, for clients that split a "
                    "model's layers over several machines (`selar run --rpc HOST:PORT,...`). The protocol has no "
                    "authentication or encryption: keep it on 127.0.0.1 or a trusted network "
                    "(docs/DISTRIBUTED.md).",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="IPv4 address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", "-p", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", "-t", type=int, default=None,
                        help="CPU threads for the CPU device (default: half the CPUs, about the physical cores)")
    parser.add_argument("--device", "-d", action="append", default=[], metavar="NAME[,NAME...]",
                        help="devices to serve, e.g. CUDA0 or CPU (repeatable; default: the GPUs, else the CPU); "
                             "--list-devices shows them")
    parser.add_argument("--list-devices", action="store_true", help="list this machine's devices and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selar_local.engine import default_threads, local_devices, serve_rpc
    from selar_local.errors import InvalidParameterError, RpcError
    from selar_local.rpc import Endpoint, handshake

    if args.list_devices:
        for device in local_devices():
            print(f"{device.name:<10} {device.kind:<5} {device.description} "
                  f"({device.memory_free >> 20} MiB free of {device.memory_total >> 20} MiB)")
        return 0
    if not 0 < args.port <= 65535:
        raise InvalidParameterError(f"invalid --port {args.port}: expected 1..65535")
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"invalid --threads {args.threads}: expected an integer >= 1")
    host = _ipv4(args.host)
    _check_port_free(host, args.port)
    names = [name for item in args.device for name in item.replace("/", ",").split(",") if name]
    if not _is_loopback(host):
        print(f"selar: WARNING: the RPC server listens on {host}:{args.port}. llama.cpp's RPC protocol has no "
              "authentication and no encryption: anyone who can reach this port can run computations on this "
              "machine's devices and read the model and activations sent to it. Never expose it to an open "
              "network; use a trusted LAN, a VPN or an SSH tunnel (docs/DISTRIBUTED.md).", file=sys.stderr, flush=True)
    threads = args.threads or default_threads()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            serve_rpc(host, args.port, n_threads=threads, device_names=names)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    # llama.cpp's server blocks in accept(); a daemon thread keeps Ctrl+C working here.
    server = threading.Thread(target=serve, name="rpc-server", daemon=True)
    server.start()
    endpoint = Endpoint("127.0.0.1" if host == "0.0.0.0" else host, args.port)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if not server.is_alive():
            if failure:
                raise failure[0]
            raise RpcError(f"llama.cpp's RPC server could not start on {host}:{args.port} (its reason is above)")
        try:
            version = handshake(endpoint, timeout=5.0)
            break
        except RpcError:
            if time.monotonic() > deadline:
                raise RpcError(f"the RPC server did not answer on {host}:{args.port} within {READY_TIMEOUT_S:g} s") from None
            server.join(0.05)
    print(f"selar: RPC server listening on {host}:{args.port} (protocol {'.'.join(map(str, version))}, "
          f"{threads} thread(s), devices: {', '.join(names) or 'default'}); Ctrl+C stops it", file=sys.stderr, flush=True)
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        print("selar: RPC server stopped", file=sys.stderr)
        return 0
    raise RpcError("llama.cpp's RPC server stopped (its reason is above)")


def _ipv4(host: str) -> str:
    from selar_local.errors import InvalidParameterError

    try:  # llama.cpp's server binds IPv4 addresses only (inet_addr)
        return str(ipaddress.IPv4Address(socket.gethostbyname(host)))
    except (OSError, ValueError):
        raise InvalidParameterError(f"invalid --host {host!r}: expected an IPv4 address such as 127.0.0.1, "
                                    "0.0.0.0 or this machine's LAN address") from None


def _check_port_free(host: str, port: int) -> None:
    """llama.cpp only prints "Failed to create server socket"; say why first."""
    from selar_local.errors import RpcError

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp's server does
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise RpcError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                       "(another rpc-server on that port? choose another with --port)") from None
    finally:
        probe.close()


def _is_loopback(host: str) -> bool:
    return ipaddress.IPv4Address(host).is_loopback
