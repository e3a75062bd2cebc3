"""The agent's side of token authentication: a projected service-account token instead of a node cert.

`CAClient(url, TokenCredentials.read(token_file, roots_file))` talks to a CA run with
`--auth tokenreview`: TLS checks the CA's serving certificate against `roots` (no client certificate is
presented), and every request carries `Authorization: Bearer <token>`. The token file is read again for
every request, because the kubelet rewrites a projected token long before it expires and an agent must
never hold on to an old one.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from mesh.ca.client import CAUnavailable
from mesh.ca.kube.tokenreview import MAX_TOKEN_BYTES
from mesh.identity import IdentityError, TrustBundle


@dataclass(frozen=True, eq=False)
class TokenCredentials:
    token_file: Path
    roots: TrustBundle

    @classmethod
    def read(cls, token_file: str | Path, roots_file: str | Path) -> TokenCredentials:
        """The roots are read now (a bad file is an error at start-up); the token at each request."""
        path = Path(roots_file)
        try:
            roots = TrustBundle.from_pem(path.read_bytes())
        except FileNotFoundError:
            raise IdentityError(f"CA roots file {path} does not exist", code="missing_file") from None
        return cls(Path(token_file), roots)

    def load_into(self, context: ssl.SSLContext, verify: bool = True) -> ssl.SSLContext:
        """Trust the CA's roots; present nothing (the token authenticates the agent)."""
        if verify:
            context.load_verify_locations(cadata=self.roots.roots_pem().decode("ascii"))
        return context

    def token(self) -> str:
        try:
            raw = self.token_file.read_bytes()
        except OSError as exc:
            raise CAUnavailable("no_token", f"service-account token {self.token_file} cannot be read: "
                                            f"{exc.strerror or exc}") from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            token = ""
        if not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise CAUnavailable("no_token", f"service-account token {self.token_file} is empty or malformed")
        return token

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def __repr__(self) -> str:  # never the token
        return f"TokenCredentials({str(self.token_file)!r})"
