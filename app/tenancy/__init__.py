"""Who may do what: tenants, API keys, and the authenticator that turns a key into a Principal.

The check of a request's key (`authorize`) is the routes' own, in `app.api.deps`.
"""
