"""The h11 module the HTTP/1.1 code uses: `h11_mypyc` (the same library compiled with mypyc, about twice
as fast on the waypoint's hot path) when it is installed, else `h11` itself. Both have the same API and
behaviour; `NODEMESH_PURE_H11=1` forces the pure-Python one (to rule the compiled fork out when debugging)."""

from __future__ import annotations

import os

if os.environ.get("NODEMESH_PURE_H11") == "1":
    import h11
else:
    try:  # pragma: no cover - depends on what is installed
        import h11_mypyc as h11
    except ImportError:  # pragma: no cover
        import h11

__all__ = ["h11"]
