-- Read models built by the projector (projections/projector.py) from campaign.events,
-- campaign.recipients and campaign.deliveries. Every row carries its tenant; every table can
-- be rebuilt by replaying the topics into empty tables from offset zero.

-- One row per campaign. A row may be created by whichever fact reaches the projector first
-- (deliveries travel on other topics than the campaign's own events), so only tenant_id,
-- campaign_id and the counters are guaranteed to be filled.
CREATE TABLE campaigns (
    tenant_id        text        NOT NULL,
    campaign_id      text        PRIMARY KEY,
    name             text,
    subject          text,
    status           text        NOT NULL DEFAULT 'draft'
                     CHECK (status IN ('draft', 'sending', 'completed', 'cancelled')),
    -- NULL until CampaignHydrated: the audience size is unknown before that.
    total            bigint      CHECK (total >= 0),
    -- Distinct recipients queued so far (a delivery seen before its RecipientQueued counts:
    -- it proves the queueing), and distinct recipients that reached each terminal status.
    queued           bigint      NOT NULL DEFAULT 0,
    sent             bigint      NOT NULL DEFAULT 0,
    failed           bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz,
    started_at       timestamptz,
    hydrated_at      timestamptz,
    completed_at     timestamptz,
    -- Latest occurred_at among counted deliveries: completed_at is derived from it and
    -- hydrated_at, so a rebuild gives the same value whatever the interleaving of topics.
    last_delivery_at timestamptz,
    -- When the projector last changed the row (wall clock, not event time).
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX campaigns_by_tenant ON campaigns (tenant_id, created_at DESC);

-- One row per recipient of a campaign; reaches a terminal status at most once.
CREATE TABLE campaign_recipients (
    tenant_id   text        NOT NULL,
    campaign_id text        NOT NULL,
    contact_id  text        NOT NULL,
    email       text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, contact_id)
);

-- Commands the command handler refused, with the reason; keyed by the event id so a
-- replayed CommandRejected is stored once.
CREATE TABLE command_rejections (
    event_id       uuid        PRIMARY KEY,
    tenant_id      text        NOT NULL,
    campaign_id    text        NOT NULL,
    command_id     uuid,
    command_type   text,
    reason         text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    correlation_id uuid        NOT NULL
);

CREATE INDEX command_rejections_by_campaign
    ON command_rejections (tenant_id, campaign_id, occurred_at);

-- Where each consumer group resumes in each partition: written in the same transaction as
-- the read-model changes of the batch that led there (Kafka's committed offsets are only a
-- lag gauge).
CREATE TABLE projector_positions (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Live progress for analysts and the CLI: pending is what is neither sent nor failed yet.
CREATE VIEW campaign_progress AS
SELECT tenant_id,
       campaign_id,
       name,
       subject,
       status,
       total,
       queued,
       sent,
       failed,
       CASE WHEN total IS NULL THEN NULL ELSE GREATEST(total - sent - failed, 0) END AS pending,
       created_at,
       started_at,
       hydrated_at,
       completed_at,
       updated_at
FROM campaigns;
