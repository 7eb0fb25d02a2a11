"""The sender service: mails every queued recipient once and reports each delivery.

Guarantee: every RecipientQueued ends in exactly one terminal delivery event (EmailSent,
EmailFailed or RecipientSkipped; published at least once, copies alike), after any number of
EmailDeferred; each attempt mails a recipient at most once, except when an SMTP outcome is
unknown (connection lost after the final ".", or a crash between the ledger's claim and
settle), which may mail it twice and is counted (`ambiguous` in the send ledger and in
EmailSent / EmailFailed).

Modules: render (template placeholders, pure), mime (the message bytes, pure), replies (SMTP
reply classes and hard bounces, pure), retries (backoff schedule and limits, pure), delivery
(what one attempt comes to, and its event, pure), decisions (routing, pre-send, replay and
resume rules, pure), ledger (the send ledger in PostgreSQL, with its pure claim rules), throttle
(token buckets per tenant and SMTP server, shared out by partitions), feeds (topics every
instance reads whole), control (pause / resume / cancel as every sender sees them),
do_not_mail (contacts suppressed, unsubscribed or deleted after hydration), smtp_pool (SMTP
connections to one relay, TLS and AUTH), relay_config and relays (several relays routed by From
domain, failover), transport (the seam between the two), work (what a batch holds), clients
(the Kafka consumer and producer), routing (where each fetched record goes), waiting (paused
delay and held partitions, resumed and swept), mailer (one attempt on a send thread), steps
(claim / mail / settle / publish / commit as the pipeline calls them), pipeline (those steps
overlapped, and the commit rule), publisher (delivery events), worker (the Kafka consume loop),
__main__ (the one wiring point), proof_mail (test sends, "proofs", of a campaign to given
addresses).
"""
