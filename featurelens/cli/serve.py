"""`featurelens serve`: the web app (feature dashboards, search, steering, circuit explorer) in your browser."""

from __future__ import annotations

import argparse
import secrets
import sys

from . import common

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765


def add_server_args(p: argparse.ArgumentParser) -> None:
    """--host and --port, as `serve` and `demo` take them."""
    common.add(p, "host", default=DEFAULT_HOST, note=f"(default {DEFAULT_HOST}: this machine only)")
    common.add(p, "port", default=DEFAULT_PORT, note=f"(default {DEFAULT_PORT})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the web app: dashboards, search, steering, circuit explorer (local server)",
                       description="Serve the data directory (--data-dir, before or after `serve`) as the web app.")
    add_server_args(p)
    common.add(p, "device", note="(models and dictionaries are loaded there on first use)")
    p.add_argument("--token", default=None, help="access token, at least 16 characters; required (and made up when not "
                                                 "given) when --host is not a loopback address")
    common.add(p, "db", note="whose analyses (written by `featurelens analyze --store URL`) and graphs are served too; "
                             "labels edited and graphs uploaded or computed in the app are saved there")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(args.host, args.port, args.token, device=args.device, db=args.db)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          device: str | None = None, db: str | None = None) -> int:
    """Serve featurelens' data directory (and the analyses in the PostgreSQL database `db`) at http://host:port/
    until interrupted (also the end of `demo`); models and dictionaries are loaded on `device` (default cpu)."""
    import uvicorn

    from ..device import check_device
    from ..errors import InputError
    from ..paths import data_dir
    from ..server import create_app
    from ..server.instance import instance_lock
    from ..server.security import check_token, is_loopback

    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1-65535, got {port}")
    if token is not None and not token.strip():
        raise InputError("--token is empty")
    check_token(host, token)
    check_device(device)
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(18)  # never serve beyond this machine without one
    root = data_dir()
    with instance_lock(root):  # a second server on this directory stops here, before touching its jobs
        app = create_app(root, token=token, host=host, device=device, db=db)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
        if not is_loopback(host):
            print(f"featurelens: warning: serving beyond this machine over plain HTTP: the token travels in the URL "
                  f"and in every request unencrypted, so anyone on the network path can read it and the data. Put a "
                  f"TLS proxy in front, or keep to 127.0.0.1 and use an SSH tunnel.", file=sys.stderr, flush=True)
        from ..store.backends import redact

        print(f"featurelens: serving {root}" + (f" and the analyses in {redact(db)}" if db else "") + f" at {url}"
              + (f" (models on {device})" if device else ""), flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
