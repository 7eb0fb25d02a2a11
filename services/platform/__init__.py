"""The local platform: a real Kafka broker, PostgreSQL server, SMTP sink and the services,
run as plain processes on loopback (no Docker engine needed)."""
