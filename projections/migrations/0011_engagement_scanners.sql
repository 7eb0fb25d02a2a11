-- Issue 16, read side continued: why a hit is machine traffic, how many links its mail had,
-- and unsubscribes per campaign.
--
-- `machine_reason` keeps the tracker's verdict (schemas.engagement: head_request,
-- scanner_agent:<name>, apple_mpp, ...) or the projector's own: 'all_links_at_once' when every
-- link of one mail was clicked within a second (services.engagement.machine.burst_clicks),
-- which no single hit shows. `links_in_mail` is what that rule needs (clicks only).
ALTER TABLE engagement_events ADD COLUMN machine_reason text;
ALTER TABLE engagement_events ADD COLUMN links_in_mail integer;

-- Per recipient: the history, now with why a hit was taken for a machine's.
CREATE OR REPLACE VIEW analyst_recipient_engagement WITH (security_invoker = true) AS
SELECT tenant_id, contact_id, campaign_id, kind, occurred_at, machine, agent, link_index, url,
       detail, event_id, machine_reason, links_in_mail
FROM engagement_events;

-- Unsubscribes per campaign: a ContactUnsubscribed that names the campaign whose mail it came
-- from (a one-click unsubscribe from its List-Unsubscribe), one row per event.
ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_kind_check;
ALTER TABLE engagement_events ADD CONSTRAINT engagement_events_kind_check
    CHECK (kind IN ('open', 'click', 'hard_bounce', 'soft_bounce', 'complaint', 'unsubscribe'));

CREATE OR REPLACE VIEW analyst_campaign_engagement WITH (security_invoker = true) AS
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
       max(c.sent) AS sent,
       count(DISTINCT e.contact_id) FILTER (WHERE kind = 'unsubscribe') AS unsubscribes
FROM engagement_events e
LEFT JOIN campaigns c ON c.tenant_id = e.tenant_id AND c.campaign_id = e.campaign_id
GROUP BY e.tenant_id, e.campaign_id;

CREATE OR REPLACE VIEW analyst_campaign_engagement_minutes WITH (security_invoker = true) AS
SELECT tenant_id, campaign_id, date_trunc('minute', occurred_at) AS minute,
       count(*) FILTER (WHERE kind = 'open' AND NOT machine) AS opens_human,
       count(*) FILTER (WHERE kind = 'open' AND machine) AS opens_machine,
       count(*) FILTER (WHERE kind = 'click' AND NOT machine) AS clicks_human,
       count(*) FILTER (WHERE kind = 'click' AND machine) AS clicks_machine,
       count(*) FILTER (WHERE kind = 'hard_bounce') AS bounces_hard,
       count(*) FILTER (WHERE kind = 'soft_bounce') AS bounces_soft,
       count(*) FILTER (WHERE kind = 'complaint') AS complaints,
       count(*) FILTER (WHERE kind = 'unsubscribe') AS unsubscribes
FROM engagement_events
GROUP BY tenant_id, campaign_id, date_trunc('minute', occurred_at);
