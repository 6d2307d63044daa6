"""Cloud stream workers: ingest -> dedup -> enrich -> detect -> sinks (InfluxDB).

Imports ``devices`` only; never ``edge``.
"""
