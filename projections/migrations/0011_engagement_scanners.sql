-- Issue 16, read side continued: why a hit is machine traffic, and how many links its mail had.
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
