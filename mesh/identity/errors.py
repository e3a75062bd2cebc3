"""The one exception type of the identity layer.

Callers (the HBONE tunnel, the CA, the certificate manager) need to tell *why* an identity was refused so
they can log it, count it and map it to a response flag, hence a stable machine-readable ``code`` next to
the human sentence.
"""

from __future__ import annotations


class IdentityError(ValueError):
    """An identity, key, CSR or certificate chain was refused; ``code`` names the cause."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
