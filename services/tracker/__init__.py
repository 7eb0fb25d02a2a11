"""The open and click tracker: a stateless HTTP service (see app.py for its guarantees)."""
