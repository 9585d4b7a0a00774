"""``gradsvc serve``, ``gradsvc train`` and ``gradsvc openapi``.

Every option of ``serve`` is a field of ``Settings``: the flags are made from them, so a flag,
its ``GRADSVC_*`` variable and its default can never disagree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

from service import logs, train_cli
from service.config import Settings

SHUTDOWN_SECONDS = 3
"""Seconds uvicorn gives the connections still open once the drain is over (or, on SIGINT,
at once) before it cancels them."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradsvc", description="A REST gradient-computation service."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (embedded defaults: 127.0.0.1:8000)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "GRADSVC_" + name.upper()
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, False) else f"; default {default}"
        help_text = f"{field.description} [{env}{shown}]"
        if field.annotation is bool:
            serve.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            continue
        kind: Any = field.annotation if field.annotation in (int, str, float) else str
        serve.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    train_cli.add_parser(sub)
    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.add_argument("--output", "-o", help="write it to this file instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "openapi":
        return _openapi(args.output)
    if args.command == "train":
        return train_cli.run(args)
    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            sys.stderr.write(f"gradsvc: {where + ': ' if where else ''}{message}\n")
        return 2
    return _serve(settings)


def _openapi(output: str | None) -> int:
    from service.app import create_app

    text = json.dumps(create_app().openapi(), indent=2, ensure_ascii=False) + "\n"
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _serve(settings: Settings) -> int:
    import uvicorn

    from service.app import create_app

    class Server(uvicorn.Server):
        """SIGTERM is the ordinary way to stop a service: drain, then exit 0.

        uvicorn would stop listening at once (a new client gets a connection error, not
        the 503 promised) and wait for every connection, an event stream's too, for up to
        its graceful timeout; then re-raise the signal, so the exit status said "killed".
        Here SIGTERM begins the app's drain (``connections.Drain``): the listener stays open
        and the app answers 503 while in-flight requests finish and streams get their final
        event; uvicorn is told to stop only when the drain is over. SIGINT (Ctrl-C) stops at
        once, as uvicorn does."""

        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and self.loop is not None and not self.should_exit:
                # A signal handler runs between any two bytecodes: the drain begins on the
                # event loop's own turn, never inside one of its callbacks.
                self.loop.call_soon_threadsafe(drain.begin)
                return
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

        async def on_tick(self, counter: int) -> bool:
            return await super().on_tick(counter) or drain.over()

    try:
        app = create_app(settings)
    except (ValueError, OSError) as exc:  # an unreadable keys file, a store URL we don't know
        sys.stderr.write(f"gradsvc: {exc}\n")
        return 2
    drain = app.state.drain
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logs.config(settings.log_level),
        access_log=False,  # gradsvc.access logs every request, as JSON, with its id
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
    )
    Server(config).run()
    return 0
