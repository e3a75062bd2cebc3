"""The one error type every config parser raises, so callers can log and surface it uniformly.

A user who wrote a bad file needs to know *where* it is bad: every error carries the path of the
offending field (`workloads[2].workloadIps[0]`) next to the cause, and `str()` renders both the way the
agent logs it and the way `nodemesh` prints it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config document was refused. `problems` lists each (path, message); the first one is `path`."""

    def __init__(self, problems: list[tuple[str, str]] | str, message: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [(problems, message or "invalid value")]
        if not problems:
            problems = [("", message or "invalid config")]
        self.problems: list[tuple[str, str]] = problems
        super().__init__(self._render())

    @property
    def path(self) -> str:
        return self.problems[0][0]

    @property
    def message(self) -> str:
        return self.problems[0][1]

    def _render(self) -> str:
        lines = [f"{p}: {m}" if p else m for p, m in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems: " + "; ".join(lines)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems, located inside a bigger document (e.g. the n-th YAML document)."""

        def join(p: str) -> str:
            if not p:
                return prefix
            return f"{prefix}{p}" if p.startswith("[") else f"{prefix}.{p}"

        return ConfigError([(join(p), m) for p, m in self.problems])
