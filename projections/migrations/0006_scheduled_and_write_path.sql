-- Scheduled campaigns in the read models, and storage settings for the projector's hot rows.

-- --- the 'scheduled' status -----------------------------------------------------------------
--
-- CampaignScheduled sets scheduled_for (its send_at) and the status 'scheduled'; the send
-- (CampaignSendRequested, by the clock or by ForceScheduledSend) moves it on to 'sending', a
-- cancel to 'cancelled'. CampaignScheduleMissed leaves 'scheduled' for 'draft' and records
-- when and why (schedule_missed_at, schedule_missed_reason), so a schedule that did not fire
-- is visible instead of looking pending forever.

ALTER TABLE campaigns DROP CONSTRAINT campaigns_status_check;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_status_check
    CHECK (status IN ('draft', 'scheduled', 'sending', 'paused', 'completed', 'cancelled'));

ALTER TABLE campaigns
    ADD COLUMN scheduled_for          timestamptz,
    ADD COLUMN schedule_missed_at     timestamptz,
    ADD COLUMN schedule_missed_reason text;

-- New columns go at the end: CREATE OR REPLACE VIEW keeps the existing ones as they are.
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
       cancelled_at,
       scheduled_for,
       schedule_missed_at,
       schedule_missed_reason
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
       hydrated_at,
       scheduled_for,
       schedule_missed_at,
       schedule_missed_reason
FROM campaigns;

-- --- storage of the rows the projector rewrites ---------------------------------------------
--
-- A recipient row is written when queued and rewritten when it settles; a campaign row is
-- rewritten by every batch that touches it (its counters). Free space left on each page lets
-- those rewrites be HOT updates (the new version on the same page, no index entry added):
-- no index covers a column they change (campaign_recipients: only the primary key
-- (campaign_id, contact_id); campaigns: the primary key and (tenant_id, created_at)).
-- Applies to pages written from now on; existing pages keep their fill.
ALTER TABLE campaign_recipients SET (fillfactor = 85);
ALTER TABLE campaigns SET (fillfactor = 50);
