"""Alembic migrations for the lookalike database; applied in-process by indexer.store."""
