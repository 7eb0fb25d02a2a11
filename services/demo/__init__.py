"""`make demo`: one real campaign through Kafka, PostgreSQL and SMTP, checked at the end."""
