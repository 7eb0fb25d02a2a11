-- Complete read models (issue 5): paused campaigns, skipped / excluded / retrying / ambiguous
-- counters, per-recipient attempt history, per-tenant daily sends and per-second throughput by
-- event time, contacts and list membership from contacts.events. Every new table carries its
-- tenant, has row-level security enabled and forced, and is read by analysts through a
-- security_invoker view (same policy shape as 0003).

-- --- campaigns ------------------------------------------------------------------------------

ALTER TABLE campaigns DROP CONSTRAINT campaigns_status_check;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_status_check
    CHECK (status IN ('draft', 'sending', 'paused', 'completed', 'cancelled'));

ALTER TABLE campaigns
    -- Distinct recipients skipped (terminal, not mailed) and excluded by the hydrator (never
    -- queued: not part of `total`); recipients waiting for a retry right now; possible
    -- duplicate mailings reported by the senders' terminal events.
    ADD COLUMN skipped              bigint      NOT NULL DEFAULT 0,
    ADD COLUMN excluded             bigint      NOT NULL DEFAULT 0,
    ADD COLUMN retrying             bigint      NOT NULL DEFAULT 0,
    ADD COLUMN ambiguous            bigint      NOT NULL DEFAULT 0,
    -- Pause state as the last CampaignPaused / CampaignResumed left it (one partition of
    -- campaign.events carries both, so "last" is well defined).
    ADD COLUMN paused               boolean     NOT NULL DEFAULT false,
    ADD COLUMN paused_at            timestamptz,
    ADD COLUMN resumed_at           timestamptz,
    ADD COLUMN pause_reason         text,
    ADD COLUMN paused_automatically boolean,
    ADD COLUMN cancelled_at         timestamptz;

UPDATE campaigns SET cancelled_at = completed_at WHERE status = 'cancelled';

-- --- campaign_recipients ----------------------------------------------------------------------

ALTER TABLE campaign_recipients DROP CONSTRAINT campaign_recipients_status_check;
ALTER TABLE campaign_recipients ADD CONSTRAINT campaign_recipients_status_check
    CHECK (status IN ('excluded', 'queued', 'retrying', 'sent', 'failed', 'skipped'));

ALTER TABLE campaign_recipients
    ADD COLUMN ambiguous     integer     NOT NULL DEFAULT 0,
    ADD COLUMN smtp_code     integer,
    -- Why a recipient was skipped or excluded.
    ADD COLUMN reason        text,
    -- Event time of the fact that set the current status (updated_at is the projector's clock).
    ADD COLUMN last_event_at timestamptz;

-- --- new tables -------------------------------------------------------------------------------

-- Non-terminal attempts (EmailDeferred), one row per event; a recipient's terminal attempt is
-- on its campaign_recipients row, so the hot path (one attempt, sent) writes one row only.
CREATE TABLE recipient_attempts (
    event_id    uuid        PRIMARY KEY,
    tenant_id   text        NOT NULL,
    campaign_id text        NOT NULL,
    contact_id  text        NOT NULL,
    attempt     integer     NOT NULL,
    smtp_code   integer,
    detail      text        NOT NULL,
    retry_at    timestamptz,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX recipient_attempts_by_recipient ON recipient_attempts (campaign_id, contact_id, attempt);

-- Terminal outcomes per tenant and UTC day of the event (not of the projector's clock, so a
-- rebuild gives the same figures).
CREATE TABLE tenant_daily_sends (
    tenant_id text   NOT NULL,
    day       date   NOT NULL,
    sent      bigint NOT NULL DEFAULT 0,
    failed    bigint NOT NULL DEFAULT 0,
    skipped   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);

-- Recipients settled (sent, failed or skipped) per campaign and second of event time: the
-- rate over the last minute reads at most 60 rows instead of scanning the recipients.
-- Backfill from the rows already projected, by the day the projector wrote them (the
-- event day was not kept before); a rebuild replaces these with event days.
INSERT INTO tenant_daily_sends (tenant_id, day, sent, failed)
SELECT tenant_id, (updated_at AT TIME ZONE 'UTC')::date,
       count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'failed')
FROM campaign_recipients
WHERE status IN ('sent', 'failed')
GROUP BY tenant_id, (updated_at AT TIME ZONE 'UTC')::date;

CREATE TABLE campaign_throughput (
    tenant_id   text        NOT NULL,
    campaign_id text        NOT NULL,
    second      timestamptz NOT NULL,
    settled     bigint      NOT NULL,
    PRIMARY KEY (campaign_id, second)
);

-- A contact as far as lists and mailability go (contacts.events folded by
-- schemas.contacts.apply_contact_event); no address or names are kept here.
CREATE TABLE contacts (
    tenant_id             text    NOT NULL,
    contact_id            text    NOT NULL,
    deleted               boolean NOT NULL DEFAULT false,
    globally_unsubscribed boolean NOT NULL DEFAULT false,
    suppressed_reason     text,
    unsubscribed_lists    text[]  NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, contact_id)
);

CREATE TABLE contact_list_members (
    tenant_id  text NOT NULL,
    list_id    text NOT NULL,
    contact_id text NOT NULL,
    PRIMARY KEY (tenant_id, list_id, contact_id)
);
CREATE INDEX contact_list_members_by_contact ON contact_list_members (tenant_id, contact_id);

-- --- row-level security -----------------------------------------------------------------------

ALTER TABLE recipient_attempts ENABLE ROW LEVEL SECURITY;
ALTER TABLE recipient_attempts FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON recipient_attempts
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON recipient_attempts
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE tenant_daily_sends ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_daily_sends FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON tenant_daily_sends
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON tenant_daily_sends
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE campaign_throughput ENABLE ROW LEVEL SECURITY;
ALTER TABLE campaign_throughput FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON campaign_throughput
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON campaign_throughput
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE contacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE contacts FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON contacts
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON contacts
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE contact_list_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE contact_list_members FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON contact_list_members
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON contact_list_members
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE
    ON recipient_attempts, tenant_daily_sends, campaign_throughput, contacts,
       contact_list_members
    TO campaign_writer;
GRANT SELECT
    ON recipient_attempts, tenant_daily_sends, campaign_throughput, contacts,
       contact_list_members
    TO campaign_analyst;

-- --- views (new columns go at the end: CREATE OR REPLACE keeps the existing ones) -------------

-- pending: recipients not yet in a terminal status (sent, failed, skipped).
CREATE OR REPLACE VIEW campaign_progress AS
SELECT tenant_id,
       campaign_id,
       name,
       subject,
       status,
       total,
       queued,
       sent,
       failed,
       CASE WHEN total IS NULL THEN NULL
            ELSE GREATEST(total - sent - failed - skipped, 0) END AS pending,
       created_at,
       started_at,
       hydrated_at,
       completed_at,
       updated_at,
       skipped,
       excluded,
       retrying,
       ambiguous,
       paused_at,
       resumed_at,
       pause_reason,
       paused_automatically,
       cancelled_at
FROM campaigns;

CREATE OR REPLACE VIEW analyst_campaign_progress WITH (security_invoker = true) AS
SELECT tenant_id,
       campaign_id,
       name,
       status,
       total,
       queued,
       sent,
       failed,
       CASE WHEN total IS NULL THEN NULL
            ELSE GREATEST(total - sent - failed - skipped, 0) END AS pending,
       started_at,
       completed_at,
       skipped,
       excluded,
       retrying,
       ambiguous,
       paused_at,
       resumed_at,
       pause_reason,
       paused_automatically,
       cancelled_at,
       created_at,
       hydrated_at
FROM campaigns;

CREATE OR REPLACE VIEW analyst_recipients WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error, updated_at,
       ambiguous, smtp_code, reason, last_event_at
FROM campaign_recipients;

-- Every attempt of every recipient: the deferred ones, then the terminal one (sent or failed,
-- from the recipient row; `attempt` is its attempt number).
CREATE VIEW analyst_recipient_attempts WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, contact_id, attempt, 'deferred'::text AS outcome, smtp_code,
       detail, retry_at, occurred_at
FROM recipient_attempts
UNION ALL
SELECT tenant_id, campaign_id, contact_id, attempts, status, smtp_code, last_error, NULL,
       last_event_at
FROM campaign_recipients
WHERE status IN ('sent', 'failed');

-- Now by the day of the event (was: the day the projector wrote it); skipped added.
CREATE OR REPLACE VIEW analyst_daily_sends WITH (security_invoker = true) AS
SELECT tenant_id, day, sent, failed, skipped
FROM tenant_daily_sends;

CREATE VIEW analyst_campaign_throughput WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, second, settled
FROM campaign_throughput;

-- Members per list, and how many of them may be mailed (not unsubscribed from that list or
-- from everything, not suppressed, not deleted).
CREATE VIEW analyst_list_counts WITH (security_invoker = true) AS
SELECT m.tenant_id,
       m.list_id,
       count(*) AS members,
       count(*) FILTER (WHERE NOT c.deleted AND NOT c.globally_unsubscribed
                          AND c.suppressed_reason IS NULL
                          AND NOT (m.list_id = ANY(c.unsubscribed_lists))) AS mailable,
       count(*) FILTER (WHERE c.globally_unsubscribed
                          OR m.list_id = ANY(c.unsubscribed_lists)) AS unsubscribed,
       count(*) FILTER (WHERE c.suppressed_reason IS NOT NULL) AS suppressed
FROM contact_list_members m
JOIN contacts c ON c.tenant_id = m.tenant_id AND c.contact_id = m.contact_id
GROUP BY m.tenant_id, m.list_id;

GRANT SELECT
    ON analyst_recipient_attempts, analyst_campaign_throughput, analyst_list_counts
    TO campaign_analyst;
