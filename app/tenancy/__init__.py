"""Who may do what: tenants, API keys, and the authenticate dependency."""
