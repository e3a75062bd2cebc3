"""`make demo` is the README's first command: it must run the mesh end to end and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

from mesh.lab.build import _list_netns
from mesh.lab.state import lab_prefix

from .conftest import unique_lab_name


def test_demo_shows_mtls_identities_policy_and_metrics_then_cleans_up(require_root):
    import glob
    import tempfile

    before = set(glob.glob(f"{tempfile.gettempdir()}/nodemesh-demo-*"))
    name = unique_lab_name()
    res = subprocess.run([sys.executable, "-m", "mesh.cli", "demo", "--name", name],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "(across nodes): 1048576 bytes echoed byte-exact" in out
    assert "(on the same node): 1048576 bytes echoed byte-exact" in out
    assert "0 packets on the app port in clear" in out
    assert ("client spiffe://cluster.local/ns/default/sa/sleep -> server "
            "spiffe://cluster.local/ns/default/sa/httpbin") in out
    assert "other (sa other) -> server: denied" in out
    assert "response_flags=DENY, connection_security_policy=mutual_tls" in out
    assert out.rstrip().endswith("OK")
    assert not [n for n in _list_netns() if n.startswith(lab_prefix(name))]
    assert set(glob.glob(f"{tempfile.gettempdir()}/nodemesh-demo-*")) == before, "the demo left files behind"
