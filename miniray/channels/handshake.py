"""The connection handshake of WorkerServer/RemoteWorker: version check and shared-secret auth.

Mutual HMAC challenge/response over JSON frames capped at 64 KiB::

    server -> client  {"proto", "nonce", "auth"}
    client -> server  {"proto", "codec", "max_size", "env", "cnonce", "mac"}
    server -> client  {"ok", "pid", "mac"} or {"ok": false, "error"}

``mac`` values are HMAC-SHA256 of both nonces under the secret, with a different label per
direction, so neither side can replay the other's answer. The secret itself never crosses the
wire. This authenticates the connection, not each later frame: on an untrusted network run the
channel through an SSH tunnel.
"""

import hashlib
import hmac
import os

from miniray.errors import AuthenticationError, ProtocolError

from .framing import PROTOCOL_VERSION, Channel

_HANDSHAKE_MAX = 64 * 1024
# What `miniray serve` prints on stdout, read by Cluster over SSH.
LISTENING = "MINIRAY_SERVE_LISTENING"  # followed by: host port pid
SECRET_PROMPT = "MINIRAY_SECRET?"  # printed (echo off) before reading --secret-stdin


def _mac(secret, label, *parts):
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    return hmac.new(key, b"|".join([label, *parts]), hashlib.sha256).hexdigest()


def server_handshake(sock, secret, max_size_cap):
    """Authenticate a client on ``sock``; return its requested options (codec, max_size, env)."""
    chan = Channel(sock, codec="json", max_size=_HANDSHAKE_MAX)
    nonce = os.urandom(16).hex()
    chan.send({"proto": PROTOCOL_VERSION, "nonce": nonce, "auth": secret is not None})
    hello = chan.recv()
    if not isinstance(hello, dict) or hello.get("proto") != PROTOCOL_VERSION:
        chan.send({"ok": False, "error": f"protocol version mismatch: server speaks "
                                         f"{PROTOCOL_VERSION}, client sent {hello!r:.60}"})
        raise ProtocolError("client speaks another protocol version")
    cnonce = str(hello.get("cnonce", ""))
    if secret is not None:
        expected = _mac(secret, b"client", nonce.encode(), cnonce.encode())
        if not hmac.compare_digest(expected, str(hello.get("mac") or "")):
            chan.send({"ok": False, "error": "authentication failed: wrong or missing secret"})
            raise AuthenticationError("client failed the shared-secret challenge")
    reply = {"ok": True, "pid": os.getpid()}
    if secret is not None:
        reply["mac"] = _mac(secret, b"server", cnonce.encode(), nonce.encode())
    chan.send(reply)
    return {
        "codec": hello.get("codec", "json"),
        "max_size": min(int(hello.get("max_size", max_size_cap)), max_size_cap),
        "env": hello.get("env") or {},
    }


def client_handshake(sock, address, secret, codec, max_size, env):
    """Authenticate to the server on ``sock`` (and it to us); return the worker's pid."""
    chan = Channel(sock, codec="json", max_size=_HANDSHAKE_MAX)
    try:
        hello = chan.recv()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{address} is not a miniray WorkerServer") from e
    if not isinstance(hello, dict) or hello.get("proto") != PROTOCOL_VERSION:
        raise ProtocolError(f"{address} speaks protocol {hello!r:.60}, we speak "
                            f"{PROTOCOL_VERSION}: upgrade miniray on both ends")
    if hello.get("auth") and secret is None:
        raise AuthenticationError(f"{address} requires a shared secret; pass secret=")
    if not hello.get("auth") and secret is not None:
        # An unauthenticated server could be anyone: do not send it pickles or read its pickles.
        raise AuthenticationError(f"{address} does not know the shared secret; refusing to talk "
                                  "to an unauthenticated server when secret= is given")
    nonce = str(hello["nonce"]).encode()
    cnonce = os.urandom(16).hex()
    mac = _mac(secret, b"client", nonce, cnonce.encode()) if secret is not None else None
    chan.send({"proto": PROTOCOL_VERSION, "codec": codec, "max_size": max_size,
               "env": env or {}, "cnonce": cnonce, "mac": mac})
    reply = chan.recv()
    if not reply.get("ok"):
        raise AuthenticationError(f"{address} refused the connection: {reply.get('error')}")
    if secret is not None:
        expected = _mac(secret, b"server", cnonce.encode(), nonce)
        if not hmac.compare_digest(expected, str(reply.get("mac") or "")):
            raise AuthenticationError(f"{address} failed to prove it knows the shared secret")
    return reply["pid"]
