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

from api.contract import ModelRef
from configuration import Settings
from runners.artifacts import find_version, imports

ARM = "__arm"  # the key under which a row carries the Arm that answers it
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
    preprocessor = bentoml.models.get(str(model.info.metadata["preprocessor_tag"]))
    if preprocessor.info.metadata["sha256"] != model.info.metadata["preprocessor_sha256"]:
        raise RoutingError(f"{preprocessor.tag} is not the preprocessor {model.tag} needs")
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
        versions = [
            m.info.labels["registered_version"]
            for m in found
            if m.info.labels.get("alias") == alias
        ]
        return str(versions[0]) if versions else None

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
