"""The `serve` command: the local labelling web app."""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import sys
import threading
import webbrowser
from pathlib import Path

from ..errors import InputError
from ..settings import default
from .learn import add_concept

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = default("port")
GRID = default("grid_page")  # photos on a grid page


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="label photos in the browser (local web app)",
        description="Start the labelling web app for PROJECT and open it in the browser (unless --no-browser). "
        "Keys: 1/y = shows the class, 0/n = does not, Backspace/u = undo, s = skip, t = train and queue the "
        f"next round. /grid shows {GRID} photos at a time (its rounds take the top candidates by default): "
        "click or Space marks a positive, Enter saves the page (marked = yes, the rest = no). /evaluate "
        "measures precision@K on the test photos against random. Every label is saved before the page moves "
        "on. Binds 127.0.0.1 by default; binding another address needs an access token (--token, or one is "
        "generated and printed).",
    )
    p.add_argument("project", type=Path, help="project folder (made with `raresift init`; rounds need `raresift embed`)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--token", default=None, metavar="T",
                   help="access token every request must carry (at least 8 characters); off this machine one is "
                   "generated and printed when none is given")
    p.add_argument("--who", default=None, help="name recorded with labels when the page gives none (default: user name)")
    add_concept(p)
    p.set_defaults(handler=cmd_serve)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from ..web import create_app

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    token = args.token
    local = is_loopback(args.host)
    if token is not None and len(token) < 8:
        raise InputError("--token must be at least 8 characters")
    if not local and token is None:
        token = secrets.token_urlsafe(24)
    allowed = None if token is not None else ["127.0.0.1", "localhost", "[::1]", "::1"]
    app = create_app(args.project, token=token, who=args.who, allowed_hosts=allowed, concept=args.concept)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Replies go out at once (accepted connections inherit the option): with Nagle's algorithm on, the
    # body of a reply waited for the ACK of its headers, which the client delays by ~40 ms on a
    # kept-alive connection: every request after the first took 44 ms more (measured on /api/strategies).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port") from exc
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"raresift: labelling {args.project} at {url}", file=sys.stderr)
    if token and args.token is None:
        print("raresift: the address is reachable from other machines; the token in the URL is required",
              file=sys.stderr)
    print("raresift: press Ctrl+C to stop (every label is already saved)", file=sys.stderr)
    sys.stderr.flush()
    if not args.no_browser:
        threading.Timer(0.8, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
