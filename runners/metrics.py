"""Prometheus metrics of the runner services, beside BentoML's. Created on first use: BentoML sets
up prometheus_client's multiprocess mode when its server starts, before any of these runs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Histogram

BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@functools.cache
def batch_rows() -> Histogram:
    """Rows per batch each runner processed (`scoring_runner_batch_rows{runner}`); BentoML's
    own `adaptive_batch_size` counts calls, and the API sends many rows per call."""
    from prometheus_client import Histogram

    return Histogram(
        "scoring_runner_batch_rows",
        "Rows in each batch a runner processed.",
        ["runner"],
        buckets=BATCH_ROW_BUCKETS,
    )
