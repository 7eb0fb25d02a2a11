"""The projector service: `python -m services.projector` keeps the PostgreSQL read models.

Guarantee: exactly-once into PostgreSQL (see projections.projector).
"""
