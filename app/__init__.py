"""piston-gateway: API keys, tenants, limits and a result cache in front of Piston."""

__version__ = "0.1.0"
