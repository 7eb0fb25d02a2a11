-- Command gateway (issue 5): the outbox of accepted commands and what each command caused.

-- Every command the HTTP gateway accepted, in acceptance order (seq). The relay
-- (services/api/outbox.py) publishes rows in seq order and stamps published_at once the broker
-- acknowledged them; a row is never deleted before that, so a command survives any Kafka
-- outage and any restart of the API.
CREATE TABLE command_outbox (
    seq          bigserial   PRIMARY KEY,
    command_id   uuid        NOT NULL UNIQUE,
    -- The physical topic (campaign.commands under the gateway's topic prefix): a relay only
    -- publishes the rows of its own topic.
    topic        text        NOT NULL,
    tenant_id    text        NOT NULL,
    aggregate_id text        NOT NULL,
    command_type text        NOT NULL,
    envelope     bytea       NOT NULL,  -- exactly the bytes published on campaign.commands
    accepted_at  timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX command_outbox_pending ON command_outbox (topic, seq) WHERE published_at IS NULL;

-- Events on campaign.events and what caused them (causation id): for a command, the events it
-- produced, or its CommandRejected. Filled by the projector; one row per event.
CREATE TABLE command_outcomes (
    event_id     uuid        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    causation_id uuid        NOT NULL,
    aggregate_id text        NOT NULL,
    event_type   text        NOT NULL,
    occurred_at  timestamptz NOT NULL
);
CREATE INDEX command_outcomes_by_cause ON command_outcomes (causation_id);

-- command_outbox: writers only (the API's service login), like send_ledger.
ALTER TABLE command_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY writer_all ON command_outbox
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE command_outcomes ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_outcomes FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON command_outcomes
    FOR SELECT TO campaign_analyst
    USING (
        tenant_id = NULLIF(current_setting('app.tenant_id', true), '')
        AND EXISTS (SELECT 1 FROM analyst_tenants g
                    WHERE g.role_name = current_user
                      AND g.tenant_id IN (NULLIF(current_setting('app.tenant_id', true), ''), '*'))
    );
CREATE POLICY writer_all ON command_outcomes
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON command_outbox, command_outcomes TO campaign_writer;
GRANT USAGE, SELECT ON SEQUENCE command_outbox_seq_seq TO campaign_writer;
GRANT SELECT ON command_outcomes TO campaign_analyst;

CREATE VIEW analyst_command_outcomes WITH (security_invoker = true) AS
SELECT tenant_id, causation_id AS command_id, aggregate_id, event_id, event_type, occurred_at
FROM command_outcomes;
GRANT SELECT ON analyst_command_outcomes TO campaign_analyst;
