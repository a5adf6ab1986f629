"""``cleardit serve``: ``add_serve_parser(subparsers)`` registers the subcommand.

It loads the model once, starts the page and serves until Ctrl+C or SIGTERM; exit code 0 after a
clean stop, 2 for a user error (a missing model, gradio not installed, a busy port).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from pathlib import Path

from ..argtypes import positive_int
from ..cli_options import add_device_option, add_dtype_option, add_model_option

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def page_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def startup_line(host: str, port: int) -> str:
    """Where the page is, and who can reach it."""
    if is_loopback(host):
        where = "this machine only; --host 0.0.0.0 serves the network"
        return f"cleardit serve: open {page_url(host, port)} ({where})"
    return (
        f"cleardit serve: open {page_url(host, port)} - listening on {host} (--host {host}): other machines "
        "can reach this page, and anyone who can reach it can generate (no login)"
    )


def _stop_on_sigterm(stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())


def cmd_serve(args: argparse.Namespace) -> int:
    from ..pipelines.loading import ModelNotFoundError, resolve_model
    from .model import load_model
    from .page import build_page, gradio, launch

    try:
        resolve_model(args.model)  # a missing model or gradio is reported before anything is loaded
        gradio()
        Path(args.output).mkdir(parents=True, exist_ok=True)
        print(f"cleardit serve: loading {args.model or 'the shipped mini model'}", flush=True)
        model = load_model(args.model, args.device, args.dtype)
    except (ModelNotFoundError, ImportError, ValueError, TypeError, OSError) as exc:
        print(f"cleardit serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"cleardit serve: {model.name} loaded on {model.device} in {model.load_seconds:.1f} s", flush=True)
    page = build_page(model, args.output)
    try:
        launch(page, args.host, args.port, args.output)
    except OSError as exc:
        print(
            f"cleardit serve: error: cannot listen on {args.host}:{args.port} ({exc}); pass another --port",
            file=sys.stderr,
        )
        return 2
    print(startup_line(args.host, args.port), flush=True)
    stop = threading.Event()
    _stop_on_sigterm(stop)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    print("cleardit serve: stopped", flush=True)
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse sub-parser collection; returns its parser."""
    serve = subparsers.add_parser(
        "serve",
        help="a local web page to generate with CLEAR and compare with full attention (needs cleardit[ui])",
        description=(
            "Serve a web page (Gradio) that generates with the model loaded once at startup: CLEAR or "
            "full attention, side by side with timings, attention FLOPs, PSNR and MS-SSIM, a gallery of the "
            "session's PNGs (with the same metadata as cleardit generate). One generation at a time; the "
            "others wait in a queue. Listens on 127.0.0.1 unless --host says otherwise. See docs/serve.md."
        ),
    )
    add_model_option(serve)
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every network)",
    )
    serve.add_argument(
        "--port", type=positive_int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    add_device_option(serve)
    add_dtype_option(serve)
    serve.add_argument(
        "--output",
        default="outputs/serve",
        help="folder for the generated PNGs, NNNNN-<prompt>.png as cleardit generate names them "
        "(default: outputs/serve/)",
    )
    serve.set_defaults(func=cmd_serve)
    return serve
