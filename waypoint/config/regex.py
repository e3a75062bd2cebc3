"""RE2 regular expressions, as Envoy's `safe_regex` uses.

User-supplied patterns run on every request. Python's backtracking `re` can take exponential time on a
hostile pattern; RE2 is linear-time and rejects what Envoy rejects (backreferences, lookaround), so a
route that works here works in Istio and the other way round.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is reported to the user as a config error, not on stderr


class RegexError(ValueError):
    pass


@lru_cache(maxsize=4096)
def compile_re2(pattern: str, ignore_case: bool = False) -> Any:
    """Compile once per distinct pattern; raises RegexError naming the RE2 parse problem."""
    source = f"(?i){pattern}" if ignore_case else pattern
    try:
        return re2.compile(source, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"invalid RE2 regular expression {pattern!r}: {reason}") from None


def full_match(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """Envoy's safe_regex matches the whole value, never a substring."""
    return compile_re2(pattern, ignore_case).fullmatch(value) is not None
