"""Helpers and peer scripts for the HBONE tests (independent implementations: Node.js http2, nghttpx)."""
