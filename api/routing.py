"""Which model versions answer: the champion, and optionally a challenger (a sticky share of
keys, or in shadow). Resolved at start-up from the registry aliases the imports carry; an admin
call (or another API worker's, through the routing table) swaps it without a restart.

A `Routing` is immutable: a request reads the current one once, so it never mixes versions,
and a swap is the assignment of a new one after its models are loaded, verified and warmed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import bentoml

from api.contract import ModelInfo, ModelRef, RoutingInfo, StoredModel
from configuration import Settings, UseCase
from runners.artifacts import find_version, imports, newest_import, preprocessor_of

ArmName = Literal["champion", "challenger"]
Mode = Literal["off", "split", "shadow"]


class RoutingError(ValueError):
    """A routing that cannot serve (unknown version, mismatched preprocessor)."""


@dataclass(frozen=True)
class Arm:
    """One model version and the preprocessor version it was trained with."""

    name: ArmName
    model_version: str
    preprocessor_version: str
    ref: ModelRef
    model: bentoml.Model = field(compare=False, repr=False)
    preprocessor: bentoml.Model = field(compare=False, repr=False)


@dataclass(frozen=True)
class Routing:
    champion: Arm
    challenger: Arm | None = None
    mode: Mode = "off"
    share: float = 0.0

    def spec(self) -> dict[str, Any]:
        """What an admin call sets and the routing table stores."""
        return {
            "champion": self.champion.model_version,
            "challenger": self.challenger.model_version if self.challenger else None,
            "mode": self.mode,
            "share": self.share,
        }

    def public(self) -> dict[str, Any]:
        return {
            "champion": self.champion.ref,
            "challenger": self.challenger.ref if self.challenger else None,
            "mode": self.mode,
            "share": self.share,
        }

    def arms(self) -> list[Arm]:
        """The arms that serve: the champion, and the challenger if there is one."""
        return [self.champion, *([self.challenger] if self.challenger else [])]

    def assign(self, keys: list[Any]) -> list[Arm]:
        """The arm that answers each row: in split mode the challenger for a fixed share of
        keys (sticky: the same key always gets the same arm; rows without a key get the
        champion), else the champion."""
        if self.mode != "split" or self.challenger is None:
            return [self.champion] * len(keys)
        return [
            self.challenger if key is not None and bucket(str(key)) < self.share else self.champion
            for key in keys
        ]


def bucket(key: str) -> float:
    """A key's stable position in [0, 1)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def arm(settings: Settings, name: ArmName, version: str) -> Arm:
    """An arm for a registry version of the serving flavor, checked against its preprocessor."""
    try:
        model = find_version(settings, settings.model_flavor, version)
    except LookupError as exc:
        raise RoutingError(str(exc)) from exc
    try:
        preprocessor = preprocessor_of(model)
    except LookupError as exc:
        raise RoutingError(str(exc)) from exc
    labels = model.info.labels
    return Arm(
        name=name,
        model_version=str(labels["registered_version"]),
        preprocessor_version=str(preprocessor.info.labels["registered_version"]),
        ref=ModelRef(
            name=labels["registered_name"],
            version=labels["registered_version"],
            alias=labels["alias"],
            flavor=settings.model_flavor,
            bento_tag=str(model.tag),
        ),
        model=model,
        preprocessor=preprocessor,
    )


def data_digest(settings: Settings, version: str) -> str | None:
    """The training data digest (lineage) of a registry version of the serving flavor."""
    try:
        model = find_version(settings, settings.model_flavor, version)
    except LookupError:
        return None
    return model.info.labels.get("data_sha256") or None


def model_info(settings: Settings, use_case: UseCase, routing: Routing) -> ModelInfo:
    """/v1/model: the use case, the champion and challenger with their lineage, the routing."""
    champion = routing.champion
    return ModelInfo(
        use_case=use_case.name,
        task=use_case.task,
        classes=list(use_case.target.classes),
        decision_threshold=use_case.decision_threshold,
        contract_version=use_case.contract_version,
        serving=champion.ref,
        routing=RoutingInfo(**routing.public()),
        models={
            "preprocessor": StoredModel.of(champion.preprocessor),
            settings.model_flavor: StoredModel.of(champion.model),
        },
    )


def routing_from_spec(settings: Settings, spec: dict[str, Any]) -> Routing:
    champion = arm(settings, "champion", str(spec["champion"]))
    challenger = spec.get("challenger")
    mode: Mode = spec.get("mode", "off") if challenger is not None else "off"
    return Routing(
        champion=champion,
        challenger=arm(settings, "challenger", str(challenger)) if challenger is not None else None,
        mode=mode,
        share=float(spec.get("share", 0.0)) if mode == "split" else 0.0,
    )


def initial_routing(settings: Settings, default: bentoml.Model) -> Routing:
    """From the aliases the imports carry: the newest import under `model_alias` (else
    `default`, the runner's own model) is the champion; the newest under `challenger_alias`,
    if it is another version, the challenger in `challenger_mode`."""
    found = imports(settings, settings.model_flavor)

    def newest(alias: str) -> str | None:
        model = newest_import(found, alias)
        return None if model is None else str(model.info.labels["registered_version"])

    champion = newest(settings.model_alias) or str(default.info.labels["registered_version"])
    challenger = newest(settings.challenger_alias)
    if challenger == champion:
        challenger = None
    return routing_from_spec(
        settings,
        {
            "champion": champion,
            "challenger": challenger,
            "mode": settings.challenger_mode,
            "share": settings.challenger_share,
        },
    )
