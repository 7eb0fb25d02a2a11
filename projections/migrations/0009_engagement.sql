-- Issue 16, read side: engagement (opens, clicks) and asynchronous bounces and complaints.
--
-- One row per distinct event (the envelope id: a hit's request id, a report's dedup-derived
-- id), written by projections/engagement_projector.py with ON CONFLICT DO NOTHING in the same
-- transaction as its positions: a redelivered or replayed record never adds a row. Every
-- count is derived from these rows by the views below, so a count can never drift from the
-- history, and a rebuild (replaying the topics into an empty table) gives the same rows.
CREATE TABLE engagement_events (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    campaign_id text        NOT NULL,
    contact_id  text        NOT NULL,
    kind        text        NOT NULL
        CHECK (kind IN ('open', 'click', 'hard_bounce', 'soft_bounce', 'complaint')),
    occurred_at timestamptz NOT NULL,
    machine     boolean     NOT NULL DEFAULT false,  -- hits only; bounces are never machine
    agent       text,                                -- schemas.engagement.AgentClass, hits only
    link_index  integer,                             -- clicks only
    url         text,                                -- clicks only
    detail      text,                                -- bounces: status; complaints: feedback type
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX engagement_events_campaign ON engagement_events (tenant_id, campaign_id, kind);
CREATE INDEX engagement_events_contact
    ON engagement_events (tenant_id, contact_id, occurred_at);

ALTER TABLE engagement_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE engagement_events FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON engagement_events
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON engagement_events
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON engagement_events TO campaign_writer;
GRANT SELECT ON engagement_events TO campaign_analyst;

-- Per campaign: unique (one per contact) and total (one per event) opens and clicks, split
-- human / machine; bounces and complaints count contacts and events alike.
CREATE VIEW analyst_campaign_engagement WITH (security_invoker = true) AS
SELECT e.tenant_id, e.campaign_id,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'open' AND NOT machine) AS opens_unique_human,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'open' AND machine) AS opens_unique_machine,
       count(*) FILTER (WHERE kind = 'open' AND NOT machine) AS opens_total_human,
       count(*) FILTER (WHERE kind = 'open' AND machine) AS opens_total_machine,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'click' AND NOT machine) AS clicks_unique_human,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'click' AND machine) AS clicks_unique_machine,
       count(*) FILTER (WHERE kind = 'click' AND NOT machine) AS clicks_total_human,
       count(*) FILTER (WHERE kind = 'click' AND machine) AS clicks_total_machine,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'hard_bounce') AS bounces_hard,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'soft_bounce') AS bounces_soft,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'complaint') AS complaints,
       max(c.sent) AS sent
FROM engagement_events e
LEFT JOIN campaigns c ON c.tenant_id = e.tenant_id AND c.campaign_id = e.campaign_id
GROUP BY e.tenant_id, e.campaign_id;
GRANT SELECT ON analyst_campaign_engagement TO campaign_analyst;

-- Per campaign and tracked link (its place in the mail): contacts that clicked, and clicks.
CREATE VIEW analyst_campaign_link_clicks WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, link_index, max(url) AS url,
       count(DISTINCT contact_id) FILTER (WHERE NOT machine) AS unique_human,
       count(DISTINCT contact_id) FILTER (WHERE machine) AS unique_machine,
       count(*) FILTER (WHERE NOT machine) AS total_human,
       count(*) FILTER (WHERE machine) AS total_machine
FROM engagement_events WHERE kind = 'click'
GROUP BY tenant_id, campaign_id, link_index;
GRANT SELECT ON analyst_campaign_link_clicks TO campaign_analyst;

-- Per campaign and minute of event time: events by kind.
CREATE VIEW analyst_campaign_engagement_minutes WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, date_trunc('minute', occurred_at) AS minute,
       count(*) FILTER (WHERE kind = 'open' AND NOT machine) AS opens_human,
       count(*) FILTER (WHERE kind = 'open' AND machine) AS opens_machine,
       count(*) FILTER (WHERE kind = 'click' AND NOT machine) AS clicks_human,
       count(*) FILTER (WHERE kind = 'click' AND machine) AS clicks_machine,
       count(*) FILTER (WHERE kind = 'hard_bounce') AS bounces_hard,
       count(*) FILTER (WHERE kind = 'soft_bounce') AS bounces_soft,
       count(*) FILTER (WHERE kind = 'complaint') AS complaints
FROM engagement_events
GROUP BY tenant_id, campaign_id, date_trunc('minute', occurred_at);
GRANT SELECT ON analyst_campaign_engagement_minutes TO campaign_analyst;

-- Per recipient: the history, one row per event.
CREATE VIEW analyst_recipient_engagement WITH (security_invoker = true) AS
SELECT tenant_id, contact_id, campaign_id, kind, occurred_at, machine, agent, link_index, url,
       detail, event_id
FROM engagement_events;
GRANT SELECT ON analyst_recipient_engagement TO campaign_analyst;

-- Per contact: soft bounces in a row, the latest ones (newer than the contact's last hard
-- bounce, open or click, by event time). A contact at SOFT_BOUNCE_STREAK_LIMIT
-- (projections/engagement_queries.py) or more is one an operator may suppress.
CREATE VIEW analyst_soft_bounce_streaks WITH (security_invoker = true) AS
SELECT e.tenant_id, e.contact_id, count(*) AS soft_bounces_in_a_row,
       max(e.occurred_at) AS last_soft_bounce_at
FROM engagement_events e
WHERE e.kind = 'soft_bounce'
  AND e.occurred_at > coalesce((
      SELECT max(o.occurred_at) FROM engagement_events o
      WHERE o.tenant_id = e.tenant_id AND o.contact_id = e.contact_id
        AND o.kind IN ('hard_bounce', 'open', 'click')), '-infinity')
GROUP BY e.tenant_id, e.contact_id;
GRANT SELECT ON analyst_soft_bounce_streaks TO campaign_analyst;
