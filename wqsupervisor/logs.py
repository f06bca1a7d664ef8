"""Logging: structlog loggers, secret redaction, and the CLI's configuration.

The library never configures structlog. When the application has configured
it, events go through the application's pipeline; when it has not, they go to
a private logger on stderr (never stdout, which belongs to the application).
Only :func:`configure_cli_logging` touches the global configuration, and only
the command line calls it. structlog itself is imported on the first log line:
importing it loads asyncio and, where installed, rich, which ``import
wqsupervisor`` must not pay for.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import traceback
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

REDACTED = "[REDACTED]"

# Keys whose values are secrets whatever they hold.
_SECRET_KEYS = re.compile(r"(pass(word|phrase)?|secret|token|cookie|private_?key|credential)", re.I)
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S
)
_MIN_SECRET_LEN = 4

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | bytes | None) -> None:
    """Make every later log line, event and status output hide ``value``.

    Passwords read from a file are registered both as read and stripped, since
    people paste them with and without the trailing newline.
    """
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    with _secrets_lock:
        for candidate in (text, text.strip()):
            if len(candidate) >= _MIN_SECRET_LEN:
                _secrets.add(candidate)


def redact_text(text: str) -> str:
    """``text`` with every registered secret and private key block replaced."""
    text = _PRIVATE_KEY_BLOCK.sub(REDACTED, text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key) and not key.endswith(("_file", "_path", "file")):
        return REDACTED if value not in (None, "", False) else value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(str(value))
    return value


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with secrets hidden, by key name and by registered value."""
    return {str(k): _redact_value(str(k), v) for k, v in data.items()}


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that applies :func:`redact` to every log line."""
    return redact(event_dict)


class _CurrentStderr:
    """``sys.stderr`` as it is when a line is written, not when the logger was made.

    The application (or a notebook, or a test harness) may replace, and close,
    the stream it had when the library logged its first line.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@functools.cache
def _fallback_logger() -> Any:
    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(_CurrentStderr()),  # type: ignore[arg-type]
        processors=[
            redact_processor,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        context_class=dict,
    ).bind(logger="wqsupervisor")


class _Redacting:
    """A logger facade that redacts every call before the real logger sees it.

    The application's structlog pipeline knows nothing of our secrets, so the
    library redacts its own lines on the way in, whoever configured logging.
    A traceback is rendered here too, as plain text and redacted: left to the
    pipeline it would be rendered after redaction, with exception messages
    and (with rich) local variables in clear.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._real, name)

        def call(event: str, *args: Any, **kw: Any) -> Any:
            rendered = _traceback_text(kw.pop("exc_info", name == "exception"))
            if rendered is not None:
                kw["exception"] = rendered
            target = self._real.error if name == "exception" else method
            return target(redact_text(event), *args, **redact(kw))

        return call


def _traceback_text(exc_info: Any) -> str | None:
    """``exc_info`` (True, an exception or a triple) as traceback text; None when there is none."""
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return None
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def get_logger() -> Any:
    """The application's structlog logger if it configured structlog, else a private one; redacting."""
    import structlog

    if structlog.is_configured():
        return _Redacting(structlog.get_logger("wqsupervisor"))
    return _Redacting(_fallback_logger())


def configure_cli_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the command line: readable lines or JSON lines on ``stream``."""
    import structlog

    out = stream if stream is not None else sys.stderr
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        raise ValueError(f"unknown log format {fmt!r}: use 'console' or 'json'")
    structlog.configure(
        processors=[
            redact_processor,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if fmt == "json" else "%H:%M:%S", utc=fmt == "json"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
