"""The embedded Piston-compatible engine: host interpreters, each job inside bubblewrap."""
