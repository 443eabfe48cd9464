"""The API worker's scoring path: each row's arm (beside the rows) -> coalesced runner calls
(preprocessor, then model) within the deadline -> the decision and fallback policy -> one call
to the Monitor. Also the shadow challenger, explanations, warm-up and the routing swap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from api.answers import Explainer, Scored
from api.coalescing import Coalescer
from api.monitor import Monitor
from api.routing import Arm, Routing, routing_from_spec
from configuration import Settings, UseCase
from configuration.policy import FallbackReason, decide

LOG = logging.getLogger(__name__)
NOT_READY_ERRORS = (ServiceUnavailable, httpx.TransportError, OSError)
Row = dict[str, Any]


@dataclass(frozen=True)
class Block:
    """Rows bound for the runners with their arms' versions, as the runners take them: what the
    coalescer joins (one concatenation per column block, not a tuple per row)."""

    raw: np.ndarray  # n x (1 + model features), object: the preprocessor version, the values
    model_versions: np.ndarray  # n floats: the model version of each row

    def __len__(self) -> int:
        return len(self.model_versions)

    @staticmethod
    def join(blocks: list[Block]) -> Block:
        if len(blocks) == 1:
            return blocks[0]
        return Block(
            np.concatenate([b.raw for b in blocks]),
            np.concatenate([b.model_versions for b in blocks]),
        )


@dataclass(frozen=True)
class Runners:
    """The runner calls the scorer makes (remote in `bentoml serve`, local in process)."""

    transform: Callable[[np.ndarray], Awaitable[np.ndarray]]
    predict_proba: Callable[[np.ndarray], Awaitable[np.ndarray]]
    contributions: Callable[[np.ndarray], Awaitable[np.ndarray]]
    load_preprocessor: Callable[[str], Awaitable[str]]
    load_model: Callable[[str], Awaitable[str]]


class Scorer:
    def __init__(
        self, settings: Settings, use_case: UseCase, runners: Runners, routing: Routing
    ) -> None:
        self.settings = settings
        self.use_case = use_case
        self.runners = runners
        self.routing = routing  # replaced whole by `swap`, never changed in place
        self.monitor = Monitor(settings, use_case, routing)
        self.coalesce = Coalescer(
            self._run_runners, Block.join, settings.api_max_batch_rows, settings.api_max_in_flight
        )
        self.explainers: dict[str, Explainer] = {}
        self.examples = [dict(e) for e in use_case.examples]

    @property
    def deadline_s(self) -> float:
        return self.settings.inference_deadline_ms / 1000

    # ---- runner calls ------------------------------------------------------------------------
    def _block(self, matrix: np.ndarray, arms: list[Arm]) -> Block:
        """The runners' input for rows of model-feature values (`UseCase.matrix`), each row by
        its arm's versions."""
        raw = np.empty((len(arms), matrix.shape[1] + 1), dtype=object)
        raw[:, 1:] = matrix
        first = arms[0]  # a request has rows: an empty one never reaches the runners
        if all(arm is first for arm in arms):  # one arm: the usual request
            raw[:, 0] = first.preprocessor_version
            versions = np.full(len(arms), float(first.model_version))
        else:
            raw[:, 0] = [arm.preprocessor_version for arm in arms]
            versions = np.array([float(arm.model_version) for arm in arms])
        return Block(raw, versions)

    async def _run_runners(self, block: Block) -> np.ndarray:
        """Probabilities (n x k) for a coalesced block, each row by its arm's versions; a row a
        runner failed on stays NaN (never guessed) and is not sent on to the model."""
        features = await self.runners.transform(block.raw)
        ok = ~np.isnan(features).any(axis=1)
        probabilities = np.full((len(block), len(self.use_case.target.classes)), np.nan)
        if ok.any():
            model_input = np.column_stack([block.model_versions, features])[ok]
            probabilities[ok] = await self.runners.predict_proba(model_input)
        return probabilities

    async def _probabilities(self, block: Block) -> tuple[np.ndarray, Any]:
        """(probabilities, failure reason or None) within the inference deadline."""
        try:
            return await asyncio.wait_for(self.coalesce(block), self.deadline_s), None
        except (TimeoutError, httpx.TimeoutException):
            reason: FallbackReason = "timeout"  # the batch runs on; its result is dropped
        except NOT_READY_ERRORS as exc:
            reason = "model_not_ready"
            LOG.warning("runner unavailable: %s", exc)
        except Exception:  # any other runner failure: logged, answered by the fallback
            reason = "model_error"
            LOG.exception("runner call failed")
        return np.full((len(block), len(self.use_case.target.classes)), np.nan), reason

    # ---- answers -----------------------------------------------------------------------------
    async def score(self, rows: list[Row]) -> Scored:
        """The answer for each row: its arm's model within the deadline, else the fallback.
        In shadow mode the challenger also scores every row, in the same runner calls, and only
        the agreement is kept. One routing per request: never mixed versions."""
        routing = self.routing
        key = self.use_case.key
        arms = routing.assign([row.get(key) if key else None for row in rows])
        shadow_arm = routing.challenger if routing.mode == "shadow" else None
        matrix = self.use_case.matrix(rows)  # once: the runners and the drift window use it
        block = self._block(matrix, arms)
        if shadow_arm is not None:
            block = Block.join([block, self._block(matrix, [shadow_arm] * len(rows))])
        probabilities, failed = await self._probabilities(block)
        n = len(rows)
        decisions = decide(
            self.use_case, probabilities[:n], lambda index: [rows[i] for i in index], failed
        )
        shadow = probabilities[n:] if shadow_arm is not None and failed is None else None
        scored = Scored(decisions, routing, arms, probabilities[:n], matrix, shadow)
        self.monitor.observe(rows, scored)
        return scored

    async def explain(self, row: Row, scored: Scored, top_k: int) -> dict[str, Any] | None:
        """The explanation of the model's answer for a one-row request (None when it has
        none)."""
        decisions, arm = scored.decisions, scored.arms[0]
        if decisions.reasons[0] not in (None, "low_confidence"):
            return None
        block = self._block(self.use_case.matrix([row]), [arm])
        features = await self.runners.transform(block.raw)
        if np.isnan(features).any():
            return None
        model_input = np.column_stack([block.model_versions, features])
        contributions = await self.runners.contributions(model_input)
        label = max(int(decisions.labels[0]), 0)
        return self.explainer(arm).explain(row, contributions[0], label, top_k)

    def explainer(self, arm: Arm) -> Explainer:
        if arm.preprocessor_version not in self.explainers:
            names = [str(n) for n in arm.preprocessor.info.metadata["feature_names"]]  # type: ignore[union-attr]
            self.explainers[arm.preprocessor_version] = Explainer(self.use_case, names)
        return self.explainers[arm.preprocessor_version]

    # ---- readiness and swaps -----------------------------------------------------------------
    async def warm(self, routing: Routing) -> str | None:
        """Score the use case's examples with every arm of `routing` through the runners (the
        deadline does not apply); None when the model answered them all, else the problem."""
        examples = self.examples or [{}]
        matrix = self.use_case.matrix(examples)
        block = Block.join([self._block(matrix, [arm] * len(examples)) for arm in routing.arms()])
        try:
            probabilities = await self.coalesce(block)
        except Exception as exc:  # runners still starting, or broken
            return repr(exc)
        return None if np.isfinite(probabilities).all() else "the model failed on an example"

    async def swap(self, spec: dict[str, Any]) -> tuple[Routing, float]:
        """Load, verify and warm the models of `spec`, then serve them: (routing, seconds).
        Requests in flight finish with the routing they started with."""
        started = time.perf_counter()
        routing = await asyncio.to_thread(routing_from_spec, self.settings, spec)
        for arm in routing.arms():
            await self.runners.load_preprocessor(arm.preprocessor_version)
            await self.runners.load_model(arm.model_version)
        problem = await self.warm(routing)
        if problem is not None:
            raise RuntimeError(f"the new routing failed its warm-up: {problem}")
        self.monitor.follow(routing)
        self.routing = routing
        return routing, time.perf_counter() - started
