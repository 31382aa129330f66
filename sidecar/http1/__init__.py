"""HTTP/1.1 on raw asyncio protocols and httptools (llhttp): the sidecar's hot data path.

The modules here speak HTTP/1.1 with the fewest Python objects per request; what a proxy must
change on the way through stays in :mod:`sidecar.forward`, and routing in the listeners.
"""
