"""Routers only: each module holds routes and calls into the modules above it."""
