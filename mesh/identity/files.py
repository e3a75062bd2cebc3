"""Writing credential files safely: keys 0600 from the first byte, whole files replaced atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file created with ``mode``, then rename.

    Creating the temp file with the final mode (not chmod afterwards) means a private key is never
    readable by others, not even for a moment; the rename means readers never see half a file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_private_file(path: Path) -> None:
    """Refuse a key file that group or others may read: fail closed rather than use a leaked key."""
    from mesh.identity.errors import IdentityError

    st = Path(path).stat()
    if st.st_mode & 0o077:
        raise IdentityError(
            f"key file {Path(path).name} has mode {st.st_mode & 0o777:04o}; it must be readable by its owner only"
            " (chmod 600)",
            code="key_permissions",
        )
