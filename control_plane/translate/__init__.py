"""Translate: the config model into Envoy resources (pure builders)."""
