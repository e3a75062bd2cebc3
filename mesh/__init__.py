"""What the node agent and the waypoint share: identity, HBONE, the config model, the lab."""
