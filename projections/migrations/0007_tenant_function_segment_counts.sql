-- Issue 5, read side: the analyst tenant predicate as one SQL function, and the read models
-- behind per-segment counts (segment definitions and the contact fields criteria read).

-- --- the tenant predicate, once ---------------------------------------------------------------

-- The tenant this transaction reads as: the one set with set_config('app.tenant_id', <t>, true),
-- and only if it (or '*') is granted to the login in analyst_tenants; otherwise NULL, which
-- no row's tenant equals: no tenant set, or a tenant not granted, shows no rows.
-- '' counts as unset: after a transaction-local setting ends, current_setting returns ''
-- rather than NULL for the rest of the session.
-- BEGIN ATOMIC: the body is bound to public.analyst_tenants when created, so a caller's
-- search_path (a temporary table named analyst_tenants, say) cannot redirect the grant check.
-- Runs as the invoker: an analyst reads its own grants through analyst_own_grants.
CREATE FUNCTION app_current_tenant() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT s.tenant
    FROM (SELECT NULLIF(current_setting('app.tenant_id', true), '') AS tenant) s
    WHERE EXISTS (SELECT 1 FROM analyst_tenants g
                  WHERE g.role_name = current_user AND g.tenant_id IN (s.tenant, '*'));
END;

-- Every analyst_tenant policy of this schema (0003, 0004, 0005 and any later migration that
-- kept the same shape) becomes `tenant_id = (SELECT app_current_tenant())`. The sub-select
-- makes the function an InitPlan: evaluated once per statement, and tenant_id can still use
-- the tables' indexes.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT schemaname, tablename FROM pg_policies
             WHERE policyname = 'analyst_tenant' AND schemaname = current_schema()
    LOOP
        EXECUTE format('DROP POLICY analyst_tenant ON %I.%I', t.schemaname, t.tablename);
        EXECUTE format('CREATE POLICY analyst_tenant ON %I.%I FOR SELECT TO campaign_analyst'
                       ' USING (tenant_id = (SELECT app_current_tenant()))',
                       t.schemaname, t.tablename);
    END LOOP;
END
$$;

-- --- segment definitions ------------------------------------------------------------------------

-- A tenant's segments as segments.events leave them (deleted ones kept, flagged). criteria
-- is the expression's JSON text (schemas.segments.Criteria; query it as criteria::json): text,
-- because jsonb cannot hold the \u0000 a criteria value may carry (a row that cannot be
-- written would block the projector), and json has no equality, which the rebuild's
-- comparison of live and rebuilt rows needs.
CREATE TABLE segments (
    tenant_id  text        NOT NULL,
    segment_id text        NOT NULL,
    name       text        NOT NULL,
    criteria   text        NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    defined_at timestamptz NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, segment_id)
);

-- The fields segment criteria read, per contact (the mailability flags and list memberships
-- stay on contacts / contact_list_members). One row per contacts row; a deleted contact keeps
-- its row with the fields emptied, as schemas.contacts.apply_contact_event leaves it.
-- attributes: a JSON object of strings. deleted repeats contacts.deleted so the profile
-- fold (projections/segment_projection.py) does not depend on the order the two are written.
CREATE TABLE contact_profiles (
    tenant_id  text  NOT NULL,
    contact_id text  NOT NULL,
    email      text  NOT NULL,
    first_name text  NOT NULL,
    last_name  text  NOT NULL,
    attributes jsonb NOT NULL DEFAULT '{}',
    deleted    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, contact_id)
);

ALTER TABLE segments ENABLE ROW LEVEL SECURITY;
ALTER TABLE segments FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON segments
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON segments
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

ALTER TABLE contact_profiles ENABLE ROW LEVEL SECURITY;
ALTER TABLE contact_profiles FORCE ROW LEVEL SECURITY;
CREATE POLICY analyst_tenant ON contact_profiles
    FOR SELECT TO campaign_analyst USING (tenant_id = (SELECT app_current_tenant()));
CREATE POLICY writer_all ON contact_profiles
    FOR ALL TO campaign_writer USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON segments, contact_profiles TO campaign_writer;
GRANT SELECT ON segments, contact_profiles TO campaign_analyst;

CREATE VIEW analyst_segments WITH (security_invoker = true) AS
SELECT tenant_id, segment_id, name, criteria, deleted, defined_at, changed_at
FROM segments;
GRANT SELECT ON analyst_segments TO campaign_analyst;

-- --- a contact's date value, read as schemas.segments reads it --------------------------------

-- The moment an ISO date ("2025-01-31", midnight UTC) or datetime ("2025-01-31T10:00",
-- "2025-01-31 10:00:00.5+02:00", "...Z"; naive means UTC) stands for, after trimming ASCII
-- whitespace. NULL for anything else, including forms Python's fromisoformat would still
-- read (week dates, basic format, other separators, Unicode whitespace): NULL means "not
-- decided here", and the segment count then evaluates that contact in Python
-- (projections/segment_sql.py). Never raises: calendar checks come before any cast, and
-- years 1 and 9999 are left to Python (an offset could move them out of its range).
-- PL/pgSQL: a LANGUAGE sql body with a sub-select is not inlined and cost ~170 us a call;
-- this one runs its expressions on the simple-expression path.
CREATE FUNCTION segment_moment(value text) RETURNS timestamptz
    LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    -- The ASCII whitespace Python's strip() removes (E-strings know no \v: \x0b is the
    -- vertical tab).
    m text[] := regexp_match(
        btrim(value, E' \t\n\r\f\x0b'),
        '^([0-9]{4})-([0-9]{2})-([0-9]{2})'
        '(?:[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,6}))?)?'
        '(Z|[+-][0-9]{2}:[0-9]{2})?)?$');
    offset_minutes int := 0;
BEGIN
    IF m IS NULL
       OR m[1]::int NOT BETWEEN 2 AND 9998 OR m[2]::int NOT BETWEEN 1 AND 12 THEN
        RETURN NULL;
    END IF;
    IF m[3]::int NOT BETWEEN 1 AND extract(day FROM make_date(m[1]::int, m[2]::int, 1)
                                               + interval '1 month - 1 day')::int THEN
        RETURN NULL;
    END IF;
    IF m[4] IS NOT NULL AND (m[4]::int > 23 OR m[5]::int > 59 OR coalesce(m[6], '0')::int > 59) THEN
        RETURN NULL;
    END IF;
    IF m[8] IS NOT NULL AND m[8] <> 'Z' THEN
        IF substr(m[8], 2, 2)::int > 23 OR substr(m[8], 5, 2)::int > 59 THEN
            RETURN NULL;
        END IF;
        offset_minutes := (CASE WHEN left(m[8], 1) = '-' THEN -1 ELSE 1 END)
                          * (substr(m[8], 2, 2)::int * 60 + substr(m[8], 5, 2)::int);
    END IF;
    -- Every part is checked above: this cast cannot fail.
    RETURN (format('%s-%s-%s %s:%s:%s.%s', m[1], m[2], m[3], coalesce(m[4], '00'),
                   coalesce(m[5], '00'), coalesce(m[6], '00'), coalesce(m[7], '0'))::timestamp
            AT TIME ZONE 'UTC') - make_interval(mins => offset_minutes);
END
$$;
