-- CSV import jobs uploaded over HTTP (issue 17), and what the GDPR erase needs.
--
-- import_jobs: one row per accepted upload, written before the API answers 202. Its row lock
-- is the claim: a runner (services/imports/runner.py) holds it FOR UPDATE for the whole run
-- on a connection of its own, so a runner that dies (SIGKILL, lost connection) releases it
-- and the next runner of any API replica takes the job up again (the import is idempotent).
-- Only the claiming transaction writes this row; progress goes to import_job_progress, which
-- anyone may update while the job row is locked.
CREATE TABLE import_jobs (
    job_id         uuid        PRIMARY KEY,
    tenant_id      text        NOT NULL,
    -- The physical contacts.events topic (under the API's topic prefix): a runner only runs
    -- the jobs of its own topic.
    topic          text        NOT NULL,
    list_id        text,
    mode           text        NOT NULL CHECK (mode IN ('upsert', 'skip-existing', 'blocklist')),
    state          text        NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'done', 'failed')),
    byte_count     bigint      NOT NULL CHECK (byte_count >= 0),
    rows_total     bigint      NOT NULL CHECK (rows_total >= 0),  -- physical lines after the header
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    imported       bigint,
    skipped        bigint,
    rejected_count bigint,
    -- The first MAX_REPORTED_REJECTIONS rejected rows: [{"line": n, "reason": "..."}].
    rejected       jsonb,
    failure        text        -- why a failed job failed
);
CREATE INDEX import_jobs_by_tenant ON import_jobs (tenant_id, created_at DESC);
CREATE INDEX import_jobs_queued ON import_jobs (topic, created_at) WHERE state = 'queued';

-- The uploaded CSV, exactly as received; deleted when its job is done (it holds addresses).
CREATE TABLE import_uploads (
    job_id    uuid  PRIMARY KEY REFERENCES import_jobs (job_id) ON DELETE CASCADE,
    tenant_id text  NOT NULL,
    body      bytea NOT NULL
);

-- Progress of a run, written as it goes (by the runner, outside the claiming transaction).
CREATE TABLE import_job_progress (
    job_id      uuid        PRIMARY KEY REFERENCES import_jobs (job_id) ON DELETE CASCADE,
    tenant_id   text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    rows_done   bigint      NOT NULL DEFAULT 0,
    started_at  timestamptz,          -- of the current (or last) attempt
    not_before  timestamptz NOT NULL DEFAULT now(),  -- a retry after a Kafka outage waits
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE import_jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE import_jobs FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON import_jobs
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON import_jobs
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE import_job_progress ENABLE ROW LEVEL SECURITY;
ALTER TABLE import_job_progress FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON import_job_progress
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON import_job_progress
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

-- The uploads: writers only (they hold whole files of addresses), like send_ledger.
ALTER TABLE import_uploads ENABLE ROW LEVEL SECURITY;
ALTER TABLE import_uploads FORCE ROW LEVEL SECURITY;
CREATE POLICY writer_all ON import_uploads
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON import_jobs, import_uploads, import_job_progress
    TO campaign_writer;
GRANT SELECT ON import_jobs, import_job_progress TO campaign_analyst;

-- The erase (projections/erase.py) asks, for every recipient row it writes, whether its
-- contact is deleted: a small partial index answers that without touching live contacts.
CREATE INDEX contacts_deleted ON contacts (tenant_id, contact_id) WHERE deleted;
-- The erase deletes a contact's published events from the command outbox (their envelopes
-- hold its address); this finds them without reading the whole outbox.
CREATE INDEX command_outbox_by_aggregate ON command_outbox (tenant_id, aggregate_id)
    WHERE published_at IS NOT NULL;
