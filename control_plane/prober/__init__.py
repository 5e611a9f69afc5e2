"""Prober: warm/cold/down per endpoint, from probes; a sans-IO scheduler and its IO shell."""
