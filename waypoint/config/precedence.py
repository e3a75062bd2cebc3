"""Gateway API route precedence: the order in which a Service's (route, rule, match) entries are tried.

Across every rule of every route attached to one Service, ties broken in this order (the spec's eight
rules): (1) an Exact path match, (2) the longest PathPrefix, (3) a method match, (4) the most header
matches, (5) the most query-parameter matches, (6) the oldest route, (7) alphabetical
`namespace/name`, (8) rule order, then match order within the rule. RegularExpression paths are
implementation-specific; like Istio they rank below every prefix (longer patterns first) and rules
without any match come last. The key is a tuple, so the order is total and deterministic.
"""

from __future__ import annotations

import datetime as dt

from waypoint.config.model import PathKind, RequestMatch, ResourceRef

# Missing timestamps sort as the newest: a route whose age is unknown never overrides an older one.
_FAR_FUTURE = dt.datetime.max.replace(tzinfo=dt.UTC)

_RANK = {PathKind.EXACT: 3, PathKind.PATH_PREFIX: 2, PathKind.STRING_PREFIX: 2, PathKind.REGEX: 1}


def path_rank(match: RequestMatch | None) -> tuple[int, int]:
    """(type rank, length): Exact > PathPrefix > RegularExpression > no path; longer first."""
    if match is None or match.path is None:
        return (-1, 0)
    path = match.path
    length = path.prefix_length if path.kind is PathKind.PATH_PREFIX else len(path.value)
    return (_RANK[path.kind], length)


def precedence_key(
    match: RequestMatch | None,
    created: dt.datetime | None,
    ref: ResourceRef,
    rule_index: int,
    match_index: int,
) -> tuple[object, ...]:
    """Sort ascending: the first entry is tried first."""
    rank, length = path_rank(match)
    has_method = match is not None and match.method is not None
    headers = len(match.headers) if match is not None else 0
    query = len(match.query) if match is not None else 0
    # A rule with no matches at all is a catch-all and goes after everything else (as Istio sorts it).
    no_match = match is None
    return (
        no_match,
        -rank,
        -length,
        not has_method,
        -headers,
        -query,
        created or _FAR_FUTURE,
        f"{ref.namespace}/{ref.name}",
        ref.kind,
        rule_index,
        match_index,
    )
