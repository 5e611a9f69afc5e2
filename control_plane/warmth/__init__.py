"""Warmth: the prober's pure state machine, the routing it implies, and the aiohttp prober."""
