"""Alembic migrations of the fleet database (``keyedge fleet upgrade`` runs them)."""
