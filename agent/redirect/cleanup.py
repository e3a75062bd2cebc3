"""Removing what a crashed agent left behind, without the agent.

A running agent removes a pod's redirection itself (``RedirectController.remove``).
These functions are for the operator (``nodemesh redirect cleanup``) when no agent will:
they work from what the kernel and the state directory show, touch only objects that
are ours (links to a program named ``nm_sk_lookup``, pins under our bpffs root, rules
at our priorities, routes in our table, our nftables table, our state records), and
report each thing they removed.
"""

from __future__ import annotations

import os

from agent.redirect import bpf_syscall as sysbpf
from agent.redirect import ebpf, nftables, routing
from agent.redirect import state as st
from mesh.netns import NetnsError, NetnsRef, netns_cookie, open_netns


def cleanup_netns(netns: NetnsRef, bpffs_root: str, state_dir: str) -> list[str]:
    """Remove every piece of redirection from one namespace; returns what was removed."""
    removed: list[str] = []
    fd = open_netns(netns)
    try:
        ino = os.fstat(fd).st_ino
        cookie = netns_cookie(fd)
        pins = ebpf.pinned_links(bpffs_root)
        for view in ebpf.links_in_netns(ino, pins):
            if not view.ours:
                continue
            if ebpf.detach_link_id(view.link_id):
                removed.append(f"sk_lookup link {view.link_id}")
            if view.pinned_at:
                ebpf.detach_pinned(view.pinned_at)
                removed.append(f"pin {view.pinned_at}")
        own_pin = os.path.join(ebpf.pin_dir(bpffs_root, cookie), ebpf.LINK_PIN_NAME)
        if os.path.exists(own_pin) and ebpf.detach_pinned(own_pin):
            removed.append(f"pin {own_pin}")

        diff = routing.remove(fd)
        removed += [f"rule {r.describe()}" for r in diff.del_rules]
        removed += [f"route {r.describe()}" for r in diff.del_routes]
        if nftables.remove(fd):
            removed.append(f"nftables table {nftables.FAMILY} {nftables.TABLE}")

        for rec in st.load_all(state_dir)[0]:
            if rec.netns_cookie != cookie:
                continue
            if rec.backend == "ebpf" and rec.sysctls_before:
                now = routing.read_sysctls(fd, rec.eth0)
                back = {k: v for k, v in rec.sysctls_before.items() if now.get(k) != v}
                routing.write_sysctls(fd, back)
                removed += [f"sysctl {k} restored to {v}" for k, v in back.items()]
            st.delete(state_dir, rec.uid)
            removed.append(f"state record {rec.uid}")
    finally:
        os.close(fd)
    return removed


def cleanup_stale(bpffs_root: str, state_dir: str) -> list[str]:
    """Remove pins whose namespace is gone and state records whose namespace is gone."""
    removed: list[str] = []
    for link_id, path in ebpf.pinned_links(bpffs_root).items():
        try:
            lfd = sysbpf.obj_get(path)
        except sysbpf.BpfError:
            continue
        try:
            defunct = sysbpf.link_info(lfd).netns_ino == 0
        finally:
            os.close(lfd)
        if defunct:
            ebpf.detach_pinned(path)
            removed.append(f"pin {path} (link {link_id}, namespace gone)")
    # Directories left empty by an interrupted removal.
    if os.path.isdir(bpffs_root):
        for entry in os.listdir(bpffs_root):
            d = os.path.join(bpffs_root, entry)
            if entry.startswith(ebpf.PIN_DIR_PREFIX) and os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
                removed.append(f"empty pin directory {d}")
    records, _ = st.load_all(state_dir)
    for rec in records:
        gone = rec.netns_path is None
        if rec.netns_path is not None:
            try:
                fd = open_netns(rec.netns_path)
            except NetnsError:
                gone = True
            else:
                try:
                    gone = netns_cookie(fd) != rec.netns_cookie
                finally:
                    os.close(fd)
        if gone and rec.netns_path is not None:
            st.delete(state_dir, rec.uid)
            removed.append(f"state record {rec.uid} (namespace {rec.netns_path} gone)")
    return removed
