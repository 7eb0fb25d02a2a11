-- Hand-picked contact ids of a send that named no contact of the campaign's tenant
-- (CampaignHydrated v3): the first ones by id (at most 1,000) and how many there were.
-- NULL until the campaign is hydrated, like total.

ALTER TABLE campaigns
    ADD COLUMN unknown_contact_ids   jsonb CHECK (jsonb_typeof(unknown_contact_ids) = 'array'),
    ADD COLUMN unknown_contact_count bigint CHECK (unknown_contact_count >= 0);

-- Campaigns hydrated before this: their CampaignHydrated v2 upcasts to none unknown, which is
-- what a rebuild from the topics projects, so the live rows say the same.
UPDATE campaigns SET unknown_contact_ids = '[]', unknown_contact_count = 0
WHERE hydrated_at IS NOT NULL;

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
       schedule_missed_reason,
       unknown_contact_ids,
       unknown_contact_count
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
       schedule_missed_reason,
       unknown_contact_ids,
       unknown_contact_count
FROM campaigns;
