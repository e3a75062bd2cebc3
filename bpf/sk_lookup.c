// SPDX-License-Identifier: Apache-2.0
//
// nodemesh: steer a mesh pod's TCP connections to the agent's listeners in that pod's
// network namespace, with one BPF_PROG_TYPE_SK_LOOKUP program.
//
// Where it runs. sk_lookup programs attach to a network namespace and run when the
// kernel looks for a socket to deliver a new connection to (a TCP SYN that matches no
// established socket). The program may pick any listening socket from a sockmap or
// sockhash and hand it the connection with bpf_sk_assign(); the connection keeps its
// addresses, so the agent reads the original destination with getsockname() and the
// client's real source with getpeername(). Nothing rewrites packets, no conntrack.
//
// What it decides, per pod:
//   * a connection arriving from the network (any interface but lo) for the pod IP and
//     any port but 15008 goes to the agent's inbound listener (15006), unless its source
//     is a node address (kubelet probes) or its port is excluded by the pod's
//     annotations; 15008 is left to the normal lookup, which finds the agent's HBONE
//     listener;
//   * a connection arriving on lo from the pod IP for a foreign address is the pod's own
//     outbound TCP, delivered locally by the policy routes the agent installs (see
//     agent/redirect/routing.py); it goes to the outbound listener (15001);
//   * everything else (the pod talking to itself, the agent's own connections to the
//     application on the pod IP, loopback) is left alone.
// The agent's own sockets carry SO_MARK 0x539 and a policy rule keeps them off the
// capture route, so they never arrive here as "outbound" and cannot loop.
//
// Fail closed: when a pod is managed but the listener it needs is missing (the agent is
// restarting), the connection is refused (SK_DROP: the kernel answers with a RST) rather
// than delivered to the application around the mesh.
//
// One program, many namespaces. The agent compiles this once per process and attaches
// the same program to every pod namespace. Per-pod settings live in shared maps keyed by
// the pod's IPv4 address, which is unique on a node (Merbridge keys its per-pod map the
// same way). The namespace cookie would be the natural key, but the verifier refuses
// bpf_get_netns_cookie() in sk_lookup programs on the kernels we run, and the packet
// names the pod anyway: the pod IP is the local address of an inbound connection and the
// source of a captured outbound one. Adding a pod is a few map updates and one
// BPF_LINK_CREATE instead of a compile; removing it is deleting its keys. The agent
// refuses two pods with one IP, since a sockhash may hold sockets of any namespace and
// bpf_sk_assign() does not check which.
//
// Only stable uapi (linux/bpf.h, linux/in.h) is used.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#ifndef MAX_PODS
#define MAX_PODS 1024
#endif
#ifndef MAX_PORT_EXCLUSIONS
#define MAX_PORT_EXCLUSIONS 16384
#endif
#ifndef MAX_NODE_PREFIXES
#define MAX_NODE_PREFIXES 8192
#endif

#define AF_INET 2
#define LOOPBACK_IFINDEX 1
#define HBONE_PORT 15008

// Listener slots in the `listeners` sockhash, per pod.
#define SLOT_OUTBOUND 0 // 15001
#define SLOT_INBOUND 1  // 15006
#define SLOT_HBONE 2    // 15008 (kept for `nodemesh redirect show`; the lookup finds it unaided)

// Counters, per pod (see `counters`).
#define CNT_INBOUND 0     // steered to 15006
#define CNT_OUTBOUND 1    // steered to 15001
#define CNT_PASS_NODE 2   // inbound from a node address, left to the application
#define CNT_PASS_PORT 3   // inbound to an excluded port, left to the application
#define CNT_NO_LISTENER 4 // refused: the agent's listener is missing
#define CNT_PASS_AGENT 5  // the agent's own connection to the application, client address kept
#define CNT_MAX 6

struct pod_cfg {
    __u32 flags; // reserved, 0; presence of the entry is what marks a pod as managed
};

struct port_key {
    __u32 pod_ip; // network byte order
    __u32 port;   // host byte order
};

// LPM trie key: the pod IP is part of the matched prefix, so one trie serves every pod;
// prefixlen = 32 + the node CIDR's length.
struct node_key {
    __u32 prefixlen;
    __u32 pod_ip; // network byte order
    __u32 addr;   // network byte order
};

struct listener_key {
    __u32 pod_ip;
    __u32 slot;
};

struct counter_key {
    __u32 pod_ip;
    __u32 which;
};

// The agent connects to the application with the *client's* address as source (IP_TRANSPARENT), so
// the app sees who really called. Such a SYN looks exactly like an inbound connection from that client
// (same addresses, same interface; sk_lookup sees no socket mark), so the agent announces each one here
// between bind() and connect(), and deletes the entry once connected. LRU: an agent that dies between
// the two cannot leak entries.
struct agent_conn_key {
    __u32 pod_ip;      // network byte order
    __u32 remote_ip;   // network byte order: the client address the agent's socket carries
    __u16 remote_port; // host byte order: the port the agent's socket was bound to
    __u16 local_port;  // host byte order: the application's port
};

BPF_HASH(pods, __u32, struct pod_cfg, MAX_PODS);
BPF_HASH(in_excluded, struct port_key, __u8, MAX_PORT_EXCLUSIONS);
BPF_LPM_TRIE(node_srcs, struct node_key, __u8, MAX_NODE_PREFIXES);
// A sockhash declared with BPF_TABLE (bcc's BPF_SOCKHASH wrapper has no lookup()) holding
// the agent's listening sockets; an entry vanishes by itself when its socket closes.
BPF_TABLE("sockhash", struct listener_key, __u64, listeners, MAX_PODS * 3);
BPF_PERCPU_HASH(counters, struct counter_key, __u64, MAX_PODS * CNT_MAX);
BPF_TABLE("lru_hash", struct agent_conn_key, __u8, agent_conns, 65536);

static __always_inline void count(__u32 pod_ip, __u32 which)
{
    struct counter_key k = {.pod_ip = pod_ip, .which = which};
    __u64 zero = 0;
    __u64 *v = counters.lookup_or_try_init(&k, &zero);
    if (v)
        (*v)++;
}

static __always_inline int steer(struct bpf_sk_lookup *ctx, __u32 pod_ip, __u32 slot, __u32 which)
{
    struct listener_key k = {.pod_ip = pod_ip, .slot = slot};
    struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&k);
    if (!sk) {
        count(pod_ip, CNT_NO_LISTENER);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        count(pod_ip, CNT_NO_LISTENER);
        return SK_DROP;
    }
    count(pod_ip, which);
    return SK_PASS;
}

int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
    // IPv4 TCP only; UDP and IPv6 take the kernel's normal path (docs/redirection.md).
    if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
        return SK_PASS;

    __u32 local_ip = ctx->local_ip4;
    __u32 remote_ip = ctx->remote_ip4;

    // The pod talking to itself, including the agent's connections to the application
    // on the pod IP. These arrive with the interface that owns the address (eth0), not
    // lo, so the address pair is what tells them apart.
    if (local_ip == remote_ip)
        return SK_PASS;

    if (ctx->ingress_ifindex == LOOPBACK_IFINDEX) {
        // Only the pod's own connections to somewhere else reach lo with a foreign
        // local address: the capture route (dev lo) delivers them here, src = pod IP.
        if ((bpf_htonl(local_ip) >> 24) == 127)
            return SK_PASS;
        if (!pods.lookup(&remote_ip))
            return SK_PASS; // not a pod this agent manages (or one being removed)
        return steer(ctx, remote_ip, SLOT_OUTBOUND, CNT_OUTBOUND);
    }

    if (!pods.lookup(&local_ip))
        return SK_PASS;
    if (ctx->local_port == HBONE_PORT)
        return SK_PASS;

    struct node_key nk = {.prefixlen = 32 + 32, .pod_ip = local_ip, .addr = remote_ip};
    if (node_srcs.lookup(&nk)) {
        count(local_ip, CNT_PASS_NODE);
        return SK_PASS;
    }

    struct port_key pk = {.pod_ip = local_ip, .port = ctx->local_port};
    if (in_excluded.lookup(&pk)) {
        count(local_ip, CNT_PASS_PORT);
        return SK_PASS;
    }

    struct agent_conn_key ak = {
        .pod_ip = local_ip,
        .remote_ip = remote_ip,
        .remote_port = bpf_ntohs(ctx->remote_port),
        .local_port = (__u16)ctx->local_port,
    };
    if (agent_conns.lookup(&ak)) {
        count(local_ip, CNT_PASS_AGENT);
        return SK_PASS;
    }
    return steer(ctx, local_ip, SLOT_INBOUND, CNT_INBOUND);
}
