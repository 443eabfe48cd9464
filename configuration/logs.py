"""No request content in any log line: tracebacks keep their frames and exception types but not
the messages of exceptions that may quote input, and client errors are not logged as errors.

Why: pydantic's ValidationError prints `input_value=` (a whole short row), SQLAlchemy errors
print bound parameters, a JSON or Unicode error can quote the body. BentoML logs each failed
request's traceback at ERROR (`Exception on /v1/predict [POST]`), uvicorn each unhandled one
(`Exception in ASGI application`). Messages are kept only for exceptions raised by this
project's own code, whose messages are written not to carry request values.

`redact_logs()` installs it process-wide: a LogRecord factory renders every traceback safely
when the record is made (whatever handler later formats it), and a filter drops BentoML's
traceback for a client error, which the access line (`scoring.access`) reports in one line.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType
from typing import Any

OWN_MODULES = ("configuration", "runners", "training", "batch", "service", "api")
WITHHELD = "(message withheld: it may quote request data)"
CLIENT_ERROR_MESSAGE = "Exception on %s [%s]"  # bentoml._internal.server.http_app.log_exception
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"
_installed = False


def _own(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in OWN_MODULES


def is_client_error(exc: BaseException | None) -> bool:
    """A failure caused by the request (BentoML answers it with a 4xx)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return isinstance(code, int) and 400 <= code < 500


def safe_traceback(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> str:
    """The traceback as Python prints it, chained causes included, with each exception's
    message replaced unless it is one of ours. Frames show code, never local values."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    chain: list[tuple[BaseException, str | None]] = []
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            chain.append((current, "\nThe above exception was the direct cause of:\n"))
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            chain.append((current, "\nDuring handling of the above exception, another:\n"))
            current = current.__context__
        else:
            chain.append((current, None))
            current = None
    for error, joiner in reversed(chain):  # the innermost first, as Python prints them
        if joiner:  # how `error` follows the one printed just before it
            lines.append(joiner + "\n")
        lines.append("Traceback (most recent call last):\n")
        frames = traceback.extract_tb(error.__traceback__ if error is not exc else tb)
        lines.extend(traceback.format_list(frames))
        name = f"{type(error).__module__}.{type(error).__qualname__}"
        message = str(error) if _own(error) else WITHHELD
        lines.append(f"{name}: {message}\n")
    return "".join(lines).rstrip("\n")


# The service's own loggers: BentoML leaves every logger but its own at the root's WARNING, so
# without a level of their own the service's INFO lines (swaps, tasks, drains) were never seen.
OWN_LOGGERS = ("scoring", "service", "api", "runners", "configuration")


def redact_logs(level: str = "INFO") -> None:
    """Install the record factory and the filter in this process (once); the service's own
    loggers at `level`."""
    global _installed
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        info = record.exc_info
        if info and info[1] is not None:
            record.client_error = is_client_error(info[1])
            record.exc_text = safe_traceback(info[0], info[1], info[2])  # type: ignore[arg-type]
            record.exc_info = None
        return record

    logging.setLogRecordFactory(factory)
    logging.getLogger(BENTOML_HTTP_LOGGER).addFilter(_drop_client_error_tracebacks)


def _drop_client_error_tracebacks(record: logging.LogRecord) -> bool:
    return not (record.msg == CLIENT_ERROR_MESSAGE and getattr(record, "client_error", False))
