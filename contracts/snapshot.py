"""Print the contract of the configured use case (SCORING_USE_CASE) as JSON."""

import json

import service
from api.contract import API_PREFIX
from api.openapi import publish
from contracts import snapshot_of

spec = service.Scoring.openapi_spec.asdict()
publish(spec, service.ROUTE_ERRORS, service.ROUTE_BODIES)
use_case = service.USE_CASE
print(json.dumps(snapshot_of(spec, API_PREFIX, use_case.name, use_case.contract_version)))
