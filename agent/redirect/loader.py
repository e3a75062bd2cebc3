"""The eBPF program loader, run as a short-lived child of the agent.

bcc compiles the program with LLVM in the process that asks, and LLVM stays mapped there (well over
100 MB). So the agent runs this as a child: it compiles and loads the program, sends the program and map
file descriptors to the agent over the inherited unix socket (SCM_RIGHTS), and exits. The kernel
objects live on, held by the agent's copies of the descriptors.

Usage (by agent/redirect/ebpf.py): `python -m agent.redirect.loader SOCKET_FD MAX_PODS`.
"""

from __future__ import annotations

import json
import socket
import sys

from agent.redirect.ebpf import MAP_NAMES, compile_with_bcc
from agent.redirect.model import RedirectUnavailable


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    max_pods = int(argv[1]) if len(argv) > 1 else 1024
    try:
        _bpf, prog_fd, maps = compile_with_bcc(max_pods)
    except RedirectUnavailable as exc:
        sock.send(json.dumps({"error": exc.cause}).encode())
        return 1
    except Exception as exc:  # anything unexpected still reaches the agent as one line
        sock.send(json.dumps({"error": f"loading the program failed: {exc}"}).encode())
        return 1
    names = list(MAP_NAMES)
    socket.send_fds(sock, [json.dumps({"maps": names}).encode()], [prog_fd, *(maps[n] for n in names)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
