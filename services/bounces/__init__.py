"""Bounces and complaints: VERP return paths, DSN/ARF parsing, the bounce receiver (SMTP) and
the providers' webhooks, all turned into EmailBounced / EmailComplained (+ ContactSuppressed)."""
