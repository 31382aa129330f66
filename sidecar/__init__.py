"""The aiohttp proxy that carries out the decisions of the :mod:`mesh` core.

Outbound listener (Host-based and absolute-form forward-proxy routing, transparent
interception), inbound listener in front of the app, admin listener. All game logic is in
:mod:`mesh`; this package only does I/O.
"""
