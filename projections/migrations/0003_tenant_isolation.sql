-- Tenant isolation for analysts (issue 5).
--
-- Who may read what:
--   campaign_analyst  NOLOGIN group. Its members read the analyst_* views only, and only the
--                     rows of the tenant set for the current transaction with
--                     set_config('app.tenant_id', <tenant>, true), and only if that tenant is
--                     granted to the login in analyst_tenants (tenant '*': any tenant, for a
--                     trusted service such as the read API that authenticates its callers
--                     and sets the tenant itself). No tenant set, or a tenant not granted:
--                     no rows, never all rows.
--   campaign_writer   NOLOGIN group for the projector and the sender in production: every
--                     row of the read models and the send ledger.
--   superusers        bypass row-level security (the dev/test `campaigns` login).
--
-- Row-level security is enabled and forced on every table that carries a tenant, so a
-- non-superuser owner is subject to it too and needs campaign_writer to write.
-- The views are security_invoker: a plain view runs with its owner's rights and would
-- bypass row-level security.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'campaign_analyst') THEN
        CREATE ROLE campaign_analyst NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    -- Roles are cluster-wide: another database's migration created it just now.
    NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'campaign_writer') THEN
        CREATE ROLE campaign_writer NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- Which tenants each analyst login may select per transaction ('*': any).
CREATE TABLE analyst_tenants (
    role_name  text        NOT NULL,
    tenant_id  text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, tenant_id)
);

-- The read-model policies look this table up as the analyst, so the analyst may read its own
-- grants (and no one else's).
ALTER TABLE analyst_tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE analyst_tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_own_grants ON analyst_tenants
    FOR SELECT TO campaign_analyst
    USING (role_name = current_user);
GRANT SELECT ON analyst_tenants TO campaign_analyst;

-- Each analyst_tenant policy below reads: the row's tenant is the one this transaction set,
-- and that tenant (or '*') is granted to the login. The grant check does not depend on the
-- row, so it runs once per statement. '' counts as unset: after a transaction-local setting
-- ends, current_setting returns '' rather than NULL for the rest of the session.

-- campaigns
ALTER TABLE campaigns ENABLE ROW LEVEL SECURITY;
ALTER TABLE campaigns FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON campaigns
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON campaigns
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

-- campaign_recipients
ALTER TABLE campaign_recipients ENABLE ROW LEVEL SECURITY;
ALTER TABLE campaign_recipients FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON campaign_recipients
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON campaign_recipients
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

-- command_rejections
ALTER TABLE command_rejections ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_rejections FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON command_rejections
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON command_rejections
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

-- send_ledger: writers only; analysts get no grant and no policy on it.
ALTER TABLE send_ledger ENABLE ROW LEVEL SECURITY;
ALTER TABLE send_ledger FORCE ROW LEVEL SECURITY;
CREATE POLICY writer_all ON send_ledger
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE
    ON campaigns, campaign_recipients, command_rejections, send_ledger, projector_positions
    TO campaign_writer;

-- Analyst views. security_invoker: row-level security applies to the querying analyst.
CREATE VIEW analyst_campaign_progress WITH (security_invoker = true) AS
SELECT tenant_id,
       campaign_id,
       name,
       status,
       total,
       queued,
       sent,
       failed,
       CASE WHEN total IS NULL THEN NULL ELSE GREATEST(total - sent - failed, 0) END AS pending,
       started_at,
       completed_at
FROM campaigns;

CREATE VIEW analyst_recipients WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error, updated_at
FROM campaign_recipients;

CREATE VIEW analyst_rejections WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, event_id, command_id, command_type, reason, occurred_at,
       correlation_id
FROM command_rejections;

-- Terminal outcomes per UTC day, by when the projector recorded them.
CREATE VIEW analyst_daily_sends WITH (security_invoker = true) AS
SELECT tenant_id,
       (updated_at AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE status = 'sent') AS sent,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM campaign_recipients
WHERE status IN ('sent', 'failed')
GROUP BY tenant_id, (updated_at AT TIME ZONE 'UTC')::date;

-- security_invoker views need the invoker to hold SELECT on the tables under them; the
-- analyst_tenant policies still filter every row read through either.
GRANT SELECT ON campaigns, campaign_recipients, command_rejections TO campaign_analyst;
GRANT SELECT
    ON analyst_campaign_progress, analyst_recipients, analyst_rejections, analyst_daily_sends
    TO campaign_analyst;

-- Nobody but the owner creates objects here (PostgreSQL 15's default, stated for clusters
-- upgraded from older versions): an analyst cannot plant a view or function in public.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
