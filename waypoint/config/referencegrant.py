"""ReferenceGrant (gateway.networking.k8s.io/v1beta1): consent for cross-namespace backendRefs.

Without a grant in the backend's namespace, a route may not send traffic to a Service there: that
backend is invalid and its share of requests gets 500 (Gateway API's rule), so one namespace cannot
pull another's traffic or reach its Services without that namespace's say-so.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError

from waypoint.config.common import Metadata, Strict
from waypoint.config.errors import ResourceError, problems_from
from waypoint.config.model import ResourceRef
from waypoint.config.parsed import ParsedReferenceGrant, ReferenceGrantFrom, ReferenceGrantTo


class FromSpec(Strict):
    group: str
    kind: Annotated[str, Field(min_length=1)]
    namespace: Annotated[str, Field(min_length=1)]


class ToSpec(Strict):
    group: str
    kind: Annotated[str, Field(min_length=1)]
    name: str | None = None


class ReferenceGrantSpec(Strict):
    from_: Annotated[list[FromSpec], Field(min_length=1, max_length=16)] = Field(alias="from")
    to: Annotated[list[ToSpec], Field(min_length=1, max_length=16)]


class ReferenceGrantDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: ReferenceGrantSpec
    status: Any = None


def parse_referencegrant(doc: Any) -> ParsedReferenceGrant:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    label = "ReferenceGrant {}/{}".format(
        (meta.get("namespace") or "default") if isinstance(meta, dict) else "default",
        meta.get("name", "?") if isinstance(meta, dict) else "?")
    try:
        parsed = ReferenceGrantDoc.model_validate(doc)
    except ValidationError as exc:
        raise ResourceError(label, problems_from(exc)) from None
    ref = ResourceRef("ReferenceGrant", parsed.metadata.namespace, parsed.metadata.name)
    return ParsedReferenceGrant(
        ref=ref,
        sources=tuple(ReferenceGrantFrom(f.group, f.kind, f.namespace) for f in parsed.spec.from_),
        targets=tuple(ReferenceGrantTo(t.group, t.kind, t.name) for t in parsed.spec.to),
    )
