"""Simulated OpenAI-compatible GPU model server: a pure timing/cache model and an aiohttp shell."""
