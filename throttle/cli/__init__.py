"""The command line (`throttle ...`); `throttle.cli.app` holds the app and its error handling.
Nothing outside this package imports it."""

from __future__ import annotations

from throttle.cli.app import app, main

__all__ = ["app", "main"]
