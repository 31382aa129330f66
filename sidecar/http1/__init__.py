"""The sidecar's own HTTP/1.1 on asyncio protocols and llhttp (``httptools``): the outbound
listener's server connection (:mod:`sidecar.http1.server`) and the pooled upstream client
(:mod:`sidecar.http1.client`). Built for the per-request cost of the data path (issue 11)."""
