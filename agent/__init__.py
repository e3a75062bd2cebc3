"""The node agent: redirection, per-pod listeners, the L4 proxy and policy."""
