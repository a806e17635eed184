"""The embedded Piston-compatible engine: host interpreters, each job inside bubblewrap.

A program of its own: it imports nothing of the gateway but `app.protocol` (Piston's wire
format) and `app.logging`, with its own settings (`config`), errors and HTTP helpers; the gateway
reaches it over HTTP only, like any Piston.
"""
