"""The waypoint's asyncio shell around the sans-IO L7 core.

* `inbound`: the HBONE listener (15008) and protocol detection on each inner stream (`sniff`);
* `http1`, `http2`: downstream HTTP/1.1 (h11) and h2c (h2) servers producing `messages.DownstreamRequest`;
* `proxy`: the per-request pipeline (authz, routing, filters, faults, circuit breaking, load balancing,
  retries and timeouts, telemetry);
* `upstream`: HTTP/1.1 and HTTP/2 clients over HBONE tunnels to the endpoints, pooled per endpoint;
* `tcp`: L4 forwarding of non-HTTP streams; `clusters`: mesh lookups and per-cluster live state.
"""
