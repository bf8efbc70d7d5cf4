"""Alembic migrations of the policy store (run them with ``qrloop db upgrade``)."""
