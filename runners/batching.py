"""Adaptive-batching options shared by the runner services, and per-row failure isolation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from configuration import Settings

LOG = logging.getLogger(__name__)


def service_options(
    settings: Settings,
    workers: int,
    routes: list[str],
    access_log: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """`@bentoml.service` options shared by the API and the runners. Connection refresh is
    effectively off: the default (every 100 requests) drops in-flight calls under load. Without
    `trace_requests`, `routes` get no OpenTelemetry spans (nothing exports them by default, and
    creating them was a quarter of the API worker's CPU). BentoML's request timeout is
    `timeout_s`, by default the settings' `request_timeout_s`."""
    return {
        "workers": workers,
        "traffic": {"timeout": timeout_s or settings.request_timeout_s},
        "runner_connection": {
            "max_requests": settings.runner_connection_max_requests,
            "max_age": settings.runner_connection_max_age_s,
        },
        "tracing": {"excluded_urls": [] if settings.trace_requests else routes},
        "logging": {"access": {"enabled": access_log}},
    }


def isolate_failures(
    compute: Callable[[Any], np.ndarray], batch: Sequence[Any] | np.ndarray, width: int
) -> np.ndarray:
    """Run `compute` on the whole batch; if it raises, run it row by row so that one bad row
    never fails its neighbours. A failed row comes back as a row of NaN (never a valid output
    of our preprocessing or models), which the API reports for that row alone."""
    if len(batch) == 0:
        return np.empty((0, width))
    try:
        return compute(batch)
    except Exception:  # any failure: isolate it below, with its cause logged
        LOG.exception("batch of %d failed; retrying row by row", len(batch))
    out = np.full((len(batch), width), np.nan)
    for i in range(len(batch)):
        try:
            out[i] = compute(batch[i : i + 1])[0]
        except Exception:
            LOG.exception("row %d of a batch failed", i)
    return out
