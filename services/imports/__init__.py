"""CSV imports uploaded over HTTP, run as asynchronous jobs inside the API process:
`job_store` (PostgreSQL: the upload, its state, progress and report) and `runner` (claims
queued jobs one at a time and streams each through services.cli.contacts_import)."""
