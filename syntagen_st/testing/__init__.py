"""Tiny models for tests, built offline. The package itself never imports this."""
