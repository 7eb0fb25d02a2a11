"""The sender service: mails every queued recipient once and reports each delivery.

Guarantee: every RecipientQueued ends in exactly one terminal delivery event (published at
least once); a recipient is mailed at most once, except when an SMTP outcome is unknown
(connection lost after DATA, or a crash between the ledger's claim and settle), which may
mail it twice and is counted in the send ledger's `ambiguous` column.

Modules: render (template placeholders, pure), mime (the message bytes, pure), replies (SMTP
reply classes, pure), delivery (retries and outcomes), smtp_pool (SMTP connections), ledger
(the send ledger in PostgreSQL), worker (the Kafka consume/send/publish loop).
"""
