"""The upstream Pistons, reached over HTTP: the pool (health, choice, DNS discovery), the
keep-alive transport under it, the runtime catalog, and the WebSocket relay.

Piston's wire format itself (the request's parser, runtime resolution) is `app.protocol`.
"""
