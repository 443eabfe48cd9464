"""Adaptive-batching options shared by the runner services, and per-row failure isolation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from _bentoml_sdk.method import APIMethod

from configuration import Settings

LOG = logging.getLogger(__name__)
S = TypeVar("S")


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
    `timeout_s`, by default the settings' `request_timeout_s`. BentoML's runner probe is off:
    the API probes its runners itself."""
    return {
        "workers": workers,
        "traffic": {"timeout": timeout_s or settings.request_timeout_s},
        "runner_connection": {
            "max_requests": settings.runner_connection_max_requests,
            "max_age": settings.runner_connection_max_age_s,
        },
        "tracing": {"excluded_urls": [] if settings.trace_requests else routes},
        "logging": {"access": {"enabled": access_log}},
        # the API caches its runners' readiness (runners/lifecycle.py RunnerProbe); BentoML's
        # probe would call them on every /readyz, and wait up to 5 s for a dead one
        "runner_probe": {"enabled": False},
    }


def constant_media_types(service: S) -> S:
    """Decorator above `@bentoml.service`: BentoML works out an API's response media type from
    its output's JSON schema on every response (a TypeAdapter and a schema build: 79 us here,
    about 5% of a runner worker's CPU per call at low load). It is constant per API: work it
    out once."""
    for api in service.apis.values():  # type: ignore[attr-defined]
        if api.output_spec.media_type is None:
            api.output_spec.media_type = api.output_spec.mime_type()
    return service


def bind_apis_once(instance: Any) -> None:
    """Call at the end of a service's `__init__`. BentoML looks an API method up on the service
    instance for every request (twice for a batchable one), and the method's descriptor builds
    its caller anew each time (`inspect.signature` and `functools.wraps`: 2.4% of the API
    worker under 100-row requests). Built once here and kept on the instance, where it comes
    before the class's descriptor (not a data descriptor). BentoML's calls (`.local`) are
    unchanged; the service never calls its own APIs through `self`."""
    for klass in reversed(type(instance).__mro__):
        for name, method in vars(klass).items():
            if isinstance(method, APIMethod):
                instance.__dict__[name] = method.__get__(instance, type(instance))


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


def version_of(value: Any) -> str:
    """A registry version as the version column carries it (2, 2.0 or "2") -> "2"."""
    return str(int(float(value)))


def by_version(batch: np.ndarray, compute: Callable[[str, np.ndarray], np.ndarray]) -> np.ndarray:
    """Column 0 of `batch` names the registry version each row is for: `compute(version, rows)`
    (column 0 dropped) per version present, results back in the batch's order. Rows for several
    versions share a batch, so a swap or a challenger never waits for a batch of its own."""
    versions = batch[:, 0]
    if len(batch) == 0 or (versions == versions[0]).all():
        return compute(version_of(versions[0]), batch[:, 1:]) if len(batch) else batch[:, 1:]
    out: np.ndarray | None = None
    for version in dict.fromkeys(versions.tolist()):
        mask = versions == version
        result = compute(version_of(version), batch[mask, 1:])
        if out is None:
            out = np.full((len(batch), *result.shape[1:]), np.nan)
        out[mask] = result
    assert out is not None
    return out
