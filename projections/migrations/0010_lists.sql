-- Issue 17: contact lists as entities (schemas/lists.py), projected from segments.events by
-- projections/lists_projection.py. A list that only memberships name (implicit) has no row
-- here; a deleted one keeps its row, flagged, since its id is never reused.
CREATE TABLE lists (
    tenant_id  text        NOT NULL,
    list_id    text        NOT NULL,
    name       text        NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, list_id)
);

ALTER TABLE lists ENABLE ROW LEVEL SECURITY;
ALTER TABLE lists FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON lists
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON lists
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON lists TO campaign_writer;
GRANT SELECT ON lists TO campaign_analyst;

-- Every list of a tenant that is not deleted: the created ones (with their names, members or
-- not) and the implicit ones (named by memberships only; name NULL), with their counts.
CREATE VIEW analyst_lists WITH (security_invoker = true) AS
SELECT coalesce(l.tenant_id, n.tenant_id) AS tenant_id,
       coalesce(l.list_id, n.list_id) AS list_id,
       l.name,
       l.created_at,
       coalesce(n.members, 0) AS members,
       coalesce(n.mailable, 0) AS mailable,
       coalesce(n.unsubscribed, 0) AS unsubscribed,
       coalesce(n.suppressed, 0) AS suppressed
FROM lists l
FULL JOIN analyst_list_counts n ON n.tenant_id = l.tenant_id AND n.list_id = l.list_id
WHERE l.deleted IS NOT TRUE;
GRANT SELECT ON analyst_lists TO campaign_analyst;
