"""Tooling that ships with the package but is not the method: fetching real weights
(models.py) and the multi-tenant throughput benchmark (bench.py)."""
