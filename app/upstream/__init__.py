"""The upstream world: Piston's request and response shapes, runtime resolution, the client."""
