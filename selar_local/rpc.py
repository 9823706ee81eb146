"""llama.cpp's RPC backend seen from the network: endpoint parsing and the protocol
handshake, in plain Python sockets. llama.cpp's own client aborts the whole process when a
server does not answer or speaks another protocol version, so every server is checked
here first and a problem becomes a clear error. The devices themselves are added by
`selar_local.engine` (the only module that touches ctypes)."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from selar_local.errors import InvalidParameterError, RpcError, RpcVersionError

# From ggml-rpc.h / transport.h of the pinned llama-cpp-python (0.3.36).
RPC_PROTO_VERSION = (7, 0, 0)
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
DEFAULT_PORT = 50052  # upstream rpc-server's default
HANDSHAKE_TIMEOUT_S = 10.0
_HELLO_RESPONSE_SIZE = 4 + RPC_CONN_CAPS_SIZE  # major, minor, patch, padding, transport caps


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` (IPv4 address or name; llama.cpp's RPC transport is IPv4 only)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port:
        raise InvalidParameterError(f"invalid RPC server {text!r}: expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidParameterError(f"invalid RPC server {text!r}: the port must be 1..65535")
    if host.startswith("[") or ":" in host:
        raise InvalidParameterError(f"invalid RPC server {text!r}: llama.cpp's RPC transport is IPv4 only")
    return Endpoint(host, int(port))


def parse_endpoints(spec: str | Iterable[str] | None) -> tuple[Endpoint, ...]:
    """`host:port[,host:port...]` or a list of such strings; duplicates are an error
    (llama.cpp keeps one connection per endpoint, so a repeat would not add a device)."""
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else [part for item in spec for part in str(item).split(",")]
    endpoints = tuple(parse_endpoint(item) for item in items if item.strip())
    if not endpoints:
        raise InvalidParameterError(f"invalid RPC server list {spec!r}: expected HOST:PORT[,HOST:PORT...]")
    seen = set()
    for endpoint in endpoints:
        if endpoint in seen:
            raise InvalidParameterError(f"RPC server {endpoint} is listed twice")
        seen.add(endpoint)
    return endpoints


def version_compatible(server: Sequence[int], client: Sequence[int] = RPC_PROTO_VERSION) -> bool:
    """llama.cpp's client rule: same major version, server minor not newer than ours."""
    return server[0] == client[0] and server[1] <= client[1]


def handshake(endpoint: Endpoint, *, timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect, send HELLO as llama.cpp's client does, return the server's protocol
    version. Raises RpcError (no answer) or RpcVersionError (another protocol)."""
    fix = f"start it on that machine with `selar rpc-server --host ADDRESS --port {endpoint.port}`"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except socket.gaierror as exc:
        raise RpcError(f"RPC server {endpoint}: cannot resolve host {endpoint.host!r} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise RpcError(f"RPC server {endpoint} refused the connection: nothing listens on that port; {fix}") from None
    except TimeoutError:
        raise RpcError(f"RPC server {endpoint} did not answer within {timeout:g} s: check the address, "
                       "that the machine is up and that no firewall blocks the port") from None
    except OSError as exc:
        raise RpcError(f"RPC server {endpoint} cannot be reached: {exc.strerror or exc}") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            header = _receive(sock, 8)
            if header is None:
                raise RpcVersionError(
                    f"RPC server {endpoint} closed the connection during the handshake: it speaks another RPC "
                    f"protocol version (this build speaks {_version(RPC_PROTO_VERSION)}) or is not a llama.cpp "
                    "rpc-server; run the same selar-local / llama-cpp-python version on both machines")
            (size,) = struct.unpack("<Q", header)
            body = _receive(sock, size) if size == _HELLO_RESPONSE_SIZE else None
        except TimeoutError:
            raise RpcError(f"RPC server {endpoint} accepted the connection but did not answer the handshake within "
                           f"{timeout:g} s: an rpc-server serves one client at a time; is another client using it?") from None
        except OSError as exc:
            raise RpcError(f"RPC server {endpoint} dropped the connection during the handshake: {exc.strerror or exc}") from None
    if body is None:
        raise RpcVersionError(f"RPC server {endpoint} answered the handshake with {size} bytes instead of "
                              f"{_HELLO_RESPONSE_SIZE}: it speaks another RPC protocol version than this build "
                              f"({_version(RPC_PROTO_VERSION)})")
    version = tuple(body[:3])
    if not version_compatible(version):
        raise RpcVersionError(
            f"RPC server {endpoint} speaks RPC protocol {_version(version)}, this build speaks "
            f"{_version(RPC_PROTO_VERSION)}: run the same selar-local / llama-cpp-python version on both machines")
    return version  # type: ignore[return-value]


def check_servers(endpoints: Sequence[Endpoint], *, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    for endpoint in endpoints:
        handshake(endpoint, timeout=timeout)


def _receive(sock: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes, or None when the peer closes first."""
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _version(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version)
