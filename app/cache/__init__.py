"""The result cache: keys, the Redis store, single-flight."""
