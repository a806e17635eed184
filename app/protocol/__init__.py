"""Piston's v2 wire format, shared by the gateway and the engine: schemas, resolve."""
