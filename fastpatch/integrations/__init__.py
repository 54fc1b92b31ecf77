"""Integrations of fastpatch with serving engines (optional extras; importing this package
needs nothing beyond fastpatch itself)."""
