"""Adaptive-batching options shared by the runner services, and per-row failure isolation."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from configuration import Settings

if TYPE_CHECKING:
    from prometheus_client import Histogram

LOG = logging.getLogger(__name__)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@functools.cache
def batch_rows() -> Histogram:
    """Rows per batch each runner processed (`scoring_runner_batch_rows{runner}`); BentoML's
    own `adaptive_batch_size` counts calls, and the API sends many rows per call."""
    from prometheus_client import Histogram  # only once BentoML has set up multiprocess mode

    return Histogram(
        "scoring_runner_batch_rows",
        "Rows in each batch a runner processed.",
        ["runner"],
        buckets=BATCH_ROW_BUCKETS,
    )


def service_options(
    settings: Settings, workers: int, routes: list[str], access_log: bool = True
) -> dict[str, Any]:
    """`@bentoml.service` options shared by the API and the runners. Connection refresh is
    effectively off: the default (every 100 requests) drops in-flight calls under load. Without
    `trace_requests`, `routes` get no OpenTelemetry spans (nothing exports them by default, and
    creating them was a quarter of the API worker's CPU)."""
    return {
        "workers": workers,
        "traffic": {"timeout": settings.request_timeout_s},
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
