"""Tenant isolation for analysts, attacked from an analyst login against the real database.

Rows for two random tenants A and B go straight into the read models as the superuser; an
analyst login allowed to read A then tries to see, count, join, guess or write its way to B.
Every role a test creates is dropped at teardown.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo

from projections import batch_writer, read_models, segment_projection
from projections.segment_counts import segment_counts
from projections.tenancy import (
    ANY_TENANT,
    WRITER_GROUP,
    InvalidTenant,
    create_analyst_login,
    current_tenant,
    drop_analyst_login,
    tenant_transaction,
)
from schemas.contacts import ContactUpserted
from schemas.segments import SegmentDefined, parse_criteria
from services.common.settings import Settings

pytestmark = pytest.mark.integration

VIEWS = ("analyst_campaign_progress", "analyst_recipients", "analyst_rejections",
         "analyst_daily_sends", "analyst_recipient_attempts", "analyst_campaign_throughput",
         "analyst_list_counts", "analyst_command_outcomes", "analyst_segments", "analyst_lists")
# Every read-model table that carries a tenant (all must have forced row-level security).
TENANT_TABLES = ("campaigns", "campaign_recipients", "command_rejections", "send_ledger",
                 "recipient_attempts", "tenant_daily_sends", "campaign_throughput", "contacts",
                 "contact_list_members", "command_outcomes", "command_outbox", "segments",
                 "contact_profiles", "lists")
DAY1 = datetime(2030, 5, 1, 10, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


@dataclass
class TenantRows:
    """What one tenant holds: the exact rows an analyst of that tenant must see."""

    tenant: str = field(default_factory=lambda: f"tenant-{uuid.uuid4().hex[:10]}")
    campaigns: list[str] = field(default_factory=list)
    recipients: list[tuple[str, str, str]] = field(default_factory=list)  # campaign, contact, status
    rejections: list[uuid.UUID] = field(default_factory=list)
    attempts: list[uuid.UUID] = field(default_factory=list)
    lists: dict[str, int] = field(default_factory=dict)  # list id -> members

    @property
    def sent(self) -> int:
        return sum(1 for *_, status in self.recipients if status == "sent")

    @property
    def failed(self) -> int:
        return sum(1 for *_, status in self.recipients if status == "failed")


def _insert(admin: psycopg.Connection[Any], rows: TenantRows, n_campaigns: int, per: int) -> None:
    statuses = ("sent", "failed", "queued")
    with admin.transaction():
        for c in range(n_campaigns):
            campaign = f"camp-{uuid.uuid4()}"
            rows.campaigns.append(campaign)
            picked = [statuses[(c + i) % 3] for i in range(per)]
            admin.execute(
                "INSERT INTO campaigns (tenant_id, campaign_id, name, status, total, queued,"
                " sent, failed, started_at) VALUES (%s, %s, %s, 'sending', %s, %s, %s, %s, %s)",
                (rows.tenant, campaign, f"{rows.tenant} #{c}", per, per,
                 picked.count("sent"), picked.count("failed"), DAY1),
            )
            for i, status in enumerate(picked):
                contact = f"contact-{uuid.uuid4().hex[:8]}"
                rows.recipients.append((campaign, contact, status))
                admin.execute(
                    "INSERT INTO campaign_recipients (tenant_id, campaign_id, contact_id, email,"
                    " status, attempts, last_error, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, 1, %s, %s)",
                    (rows.tenant, campaign, contact, f"{contact}@{rows.tenant}.example",
                     status, "550 no such user" if status == "failed" else None,
                     DAY1 if i % 2 else DAY2),
                )
            rejection = uuid.uuid4()
            rows.rejections.append(rejection)
            admin.execute(
                "INSERT INTO command_outcomes (event_id, tenant_id, causation_id, aggregate_id,"
                " event_type, occurred_at) VALUES (%s, %s, %s, %s, 'CommandRejected', %s)",
                (rejection, rows.tenant, uuid.uuid4(), campaign, DAY1))
            admin.execute(
                "INSERT INTO command_outbox (command_id, topic, tenant_id, aggregate_id,"
                " command_type, envelope) VALUES (%s, 'isolation.test', %s, %s, 'X', '')",
                (uuid.uuid4(), rows.tenant, campaign))
            admin.execute(
                "INSERT INTO command_rejections (event_id, tenant_id, campaign_id, reason,"
                " occurred_at, correlation_id) VALUES (%s, %s, %s, %s, %s, %s)",
                (rejection, rows.tenant, campaign, f"refused for {rows.tenant}", DAY1,
                 uuid.uuid4()),
            )
            attempt = uuid.uuid4()
            rows.attempts.append(attempt)
            admin.execute(
                "INSERT INTO recipient_attempts (event_id, tenant_id, campaign_id, contact_id,"
                " attempt, smtp_code, detail, occurred_at) VALUES (%s, %s, %s, %s, 1, 451, %s, %s)",
                (attempt, rows.tenant, campaign, rows.recipients[-1][1], "451 later", DAY1),
            )
            admin.execute(
                "INSERT INTO campaign_throughput (tenant_id, campaign_id, second, settled)"
                " VALUES (%s, %s, %s, %s)",
                (rows.tenant, campaign, DAY1, picked.count("sent") + picked.count("failed")),
            )
        admin.execute(
            "INSERT INTO send_ledger (campaign_id, contact_id, tenant_id, message_id)"
            " VALUES (%s, %s, %s, %s)",
            (rows.campaigns[0], rows.recipients[0][1], rows.tenant, f"<{uuid.uuid4()}@test>"),
        )
        # Daily sends as the projector keeps them: per tenant and day of the outcome.
        for day in (DAY1, DAY2):
            outcomes = [status for i, (*_, status) in enumerate(rows.recipients)
                        if (day == DAY1) == bool(i % per % 2)]
            admin.execute(
                "INSERT INTO tenant_daily_sends (tenant_id, day, sent, failed) VALUES (%s, %s, %s, %s)",
                (rows.tenant, day.date(), outcomes.count("sent"), outcomes.count("failed")),
            )
        # Lists: a shared list id in both tenants must still count per tenant.
        for list_id, members in (("newsletter", n_campaigns + 1), (f"own-{rows.tenant}", 2)):
            rows.lists[list_id] = members
            for m in range(members):
                contact = f"{list_id}-{m}"
                admin.execute(
                    "INSERT INTO contacts (tenant_id, contact_id) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING", (rows.tenant, contact))
                admin.execute(
                    "INSERT INTO contact_list_members (tenant_id, list_id, contact_id)"
                    " VALUES (%s, %s, %s)", (rows.tenant, list_id, contact))
        # Segments and the profiles they read, as the projector writes them: the same segment
        # id in both tenants, matching every member of 'newsletter' (and its own list).
        with admin.cursor() as cur:
            segment_projection.write_profiles(cur, {
                (rows.tenant, f"{list_id}-{m}"): [ContactUpserted(
                    contact_id=f"{list_id}-{m}", email=f"{list_id}-{m}@example.com",
                    attributes={"plan": "pro"})]
                for list_id, members in rows.lists.items() for m in range(members)})
            segment_projection.write_segments(cur, [(rows.tenant, SegmentDefined(
                segment_id="newsletter-pro", name=f"pro readers of {rows.tenant}",
                criteria=parse_criteria({"op": "all", "conditions": [
                    {"op": "in_list", "list_id": "newsletter"},
                    {"op": "eq", "field": "attr.plan", "value": "pro"}]})), DAY1)])


def _delete(admin: psycopg.Connection[Any], rows: TenantRows) -> None:
    with admin.transaction():
        for table in TENANT_TABLES:
            admin.execute(
                psycopg.sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
                    psycopg.sql.Identifier(table)
                ),
                (rows.tenant,),
            )


@pytest.fixture(scope="module")
def admin(platform_settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def tenants(admin: psycopg.Connection[Any]) -> Iterator[tuple[TenantRows, TenantRows]]:
    a, b = TenantRows(), TenantRows()
    _insert(admin, a, n_campaigns=3, per=5)
    _insert(admin, b, n_campaigns=4, per=7)
    yield a, b
    _delete(admin, a)
    _delete(admin, b)


class Logins:
    """Creates roles with random names and passwords; drops every one of them at the end."""

    def __init__(self, admin: psycopg.Connection[Any], admin_url: str) -> None:
        self.admin = admin
        self.admin_url = admin_url
        self.names: list[str] = []
        self.connections: list[psycopg.Connection[Any]] = []

    def _name(self, kind: str) -> str:
        name = f"test_{kind}_{uuid.uuid4().hex[:12]}"
        self.names.append(name)
        return name

    def connect(self, name: str, password: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            make_conninfo(self.admin_url, user=name, password=password), autocommit=True
        )
        self.connections.append(conn)
        return conn

    def analyst(self, *tenants: str) -> psycopg.Connection[Any]:
        name, password = self._name("analyst"), secrets.token_urlsafe(16)
        create_analyst_login(self.admin, name, password, tenants=tenants)
        return self.connect(name, password)

    def writer(self) -> psycopg.Connection[Any]:
        name, password = self._name("writer"), secrets.token_urlsafe(16)
        self.admin.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(password),
                psycopg.sql.Identifier(WRITER_GROUP),
            )
        )
        return self.connect(name, password)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        for name in self.names:
            drop_analyst_login(self.admin, name)


@pytest.fixture(scope="module")
def logins(
    admin: psycopg.Connection[Any], platform_settings: Settings
) -> Iterator[Logins]:
    made = Logins(admin, platform_settings.database_url)
    yield made
    made.close()


@pytest.fixture(scope="module")
def analyst_a(
    logins: Logins, tenants: tuple[TenantRows, TenantRows]
) -> psycopg.Connection[Any]:
    return logins.analyst(tenants[0].tenant)


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


# --- what an analyst sees -------------------------------------------------------------------


def test_each_view_shows_exactly_the_tenant_set_for_the_transaction(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with tenant_transaction(analyst_a, a.tenant):
        assert current_tenant(analyst_a) == a.tenant
        for view in VIEWS:
            seen = {r[0] for r in analyst_a.execute(f"SELECT DISTINCT tenant_id FROM {view}")}  # noqa: S608
            assert seen == {a.tenant}, view
        campaigns = {r[0] for r in analyst_a.execute(
            "SELECT campaign_id FROM analyst_campaign_progress")}
        assert campaigns == set(a.campaigns)
        recipients = set(analyst_a.execute(
            "SELECT campaign_id, contact_id, status FROM analyst_recipients").fetchall())
        assert recipients == set(a.recipients)
        rejections = {r[0] for r in analyst_a.execute("SELECT event_id FROM analyst_rejections")}
        assert rejections == set(a.rejections)
        outcomes = {r[0] for r in analyst_a.execute(
            "SELECT event_id FROM analyst_command_outcomes")}
        assert outcomes == set(a.rejections)
        attempts = {r[0] for r in analyst_a.execute(
            "SELECT event_id FROM recipient_attempts")}
        assert attempts == set(a.attempts)
        lists = dict(analyst_a.execute(
            "SELECT list_id, members FROM analyst_list_counts").fetchall())
        assert lists == a.lists
        # Base tables granted for the security_invoker views are filtered the same way.
        assert _one(analyst_a, "SELECT count(*) FROM campaigns") == len(a.campaigns)


def test_aggregates_count_only_the_tenant(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with tenant_transaction(analyst_a, a.tenant):
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == len(a.recipients)
        assert _one(analyst_a, "SELECT count(*) FROM analyst_campaign_progress") == len(a.campaigns)
        assert _one(analyst_a, "SELECT sum(sent) FROM analyst_campaign_progress") == a.sent
        assert _one(analyst_a, "SELECT sum(failed) FROM analyst_campaign_progress") == a.failed
        assert _one(analyst_a, "SELECT count(*) FROM analyst_rejections") == len(a.rejections)
        sent, failed = analyst_a.execute(
            "SELECT sum(sent), sum(failed) FROM analyst_daily_sends").fetchone() or (None, None)
        assert (sent, failed) == (a.sent, a.failed)
        days = {r[0] for r in analyst_a.execute("SELECT day FROM analyst_daily_sends")}
        assert days == {DAY1.date(), DAY2.date()}
        assert _one(analyst_a, "SELECT count(DISTINCT tenant_id) FROM analyst_recipients") == 1
        settled = _one(analyst_a, "SELECT sum(settled) FROM analyst_campaign_throughput")
        assert settled == a.sent + a.failed
        # Only the tenant's own members of the list id both tenants use.
        assert _one(analyst_a, "SELECT members FROM analyst_list_counts"
                               " WHERE list_id = 'newsletter'") == a.lists["newsletter"]
        assert _one(analyst_a, "SELECT count(*) FROM contact_list_members") == sum(
            a.lists.values())
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipient_attempts"
                               " WHERE outcome = 'deferred'") == len(a.attempts)


def test_joins_between_views_stay_in_the_tenant(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with tenant_transaction(analyst_a, a.tenant):
        rows = analyst_a.execute(
            "SELECT p.tenant_id, r.tenant_id, j.tenant_id"
            " FROM analyst_campaign_progress p"
            " JOIN analyst_recipients r USING (campaign_id)"
            " LEFT JOIN analyst_rejections j USING (campaign_id)"
        ).fetchall()
        assert len(rows) == len(a.recipients)
        assert {t for row in rows for t in row} == {a.tenant}
        # A cross join would multiply in the other tenant's rows if any were visible.
        assert _one(
            analyst_a,
            "SELECT count(*) FROM analyst_campaign_progress, analyst_rejections",
        ) == len(a.campaigns) * len(a.rejections)


def test_segment_counts_count_only_the_tenant(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, b = tenants
    with tenant_transaction(analyst_a, a.tenant):
        counts = segment_counts(analyst_a, a.tenant, DAY2)
        assert [(c.segment_id, c.name, c.matching, c.mailable) for c in counts] == [
            ("newsletter-pro", f"pro readers of {a.tenant}", a.lists["newsletter"],
             a.lists["newsletter"])]
        # Naming B's tenant inside A's transaction counts nothing of B's.
        assert segment_counts(analyst_a, b.tenant, DAY2) == []
        # Nor can B's segment or contacts be reached by id, or counted in an aggregate.
        assert _one(analyst_a, "SELECT count(*) FROM analyst_segments"
                               " WHERE segment_id = 'newsletter-pro'") == 1
        assert _one(analyst_a, "SELECT count(*) FROM contact_profiles") == sum(a.lists.values())
        assert _one(analyst_a, "SELECT count(*) FROM contact_profiles p JOIN analyst_segments s"
                               " ON s.tenant_id <> p.tenant_id") == 0


def test_the_tenant_predicate_is_one_function_on_every_policy(
    admin: psycopg.Connection[Any], analyst_a: psycopg.Connection[Any],
    tenants: tuple[TenantRows, TenantRows],
) -> None:
    a, b = tenants
    quals = dict(admin.execute(
        "SELECT tablename, qual FROM pg_policies WHERE schemaname = current_schema()"
        " AND policyname = 'analyst_tenant'").fetchall())
    assert set(TENANT_TABLES) - {"send_ledger", "command_outbox"} <= set(quals)
    assert {q.replace(" ", "") for q in quals.values()} == {
        "(tenant_id=(SELECTapp_current_tenant()ASapp_current_tenant))"}
    # Its value: the granted tenant of this transaction, else NULL.
    with tenant_transaction(analyst_a, a.tenant):
        assert _one(analyst_a, "SELECT app_current_tenant()") == a.tenant
    with tenant_transaction(analyst_a, b.tenant):
        assert _one(analyst_a, "SELECT app_current_tenant()") is None
    assert _one(analyst_a, "SELECT app_current_tenant()") is None


def test_a_temporary_grant_table_does_not_redirect_the_grant_check(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    _, b = tenants
    # pg_temp comes first on the search path: a look-up by name would find this table.
    with analyst_a.transaction():
        analyst_a.execute("CREATE TEMPORARY TABLE analyst_tenants (role_name text, tenant_id text)"
                          " ON COMMIT DROP")
        analyst_a.execute("INSERT INTO analyst_tenants VALUES (current_user, '*')")
        analyst_a.execute("SELECT set_config('app.tenant_id', %s, true)", (b.tenant,))
        assert _one(analyst_a, "SELECT count(*) FROM campaigns") == 0
        assert _one(analyst_a, "SELECT count(*) FROM contact_profiles") == 0


def test_the_other_tenant_cannot_be_guessed_by_id(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, b = tenants
    with tenant_transaction(analyst_a, a.tenant):
        for campaign in b.campaigns:
            for view in ("analyst_campaign_progress", "analyst_recipients", "analyst_rejections",
                         "campaigns", "campaign_recipients", "command_rejections",
                         "analyst_recipient_attempts", "analyst_campaign_throughput",
                         "recipient_attempts", "campaign_throughput"):
                assert analyst_a.execute(
                    f"SELECT 1 FROM {view} WHERE campaign_id = %s", (campaign,)  # noqa: S608
                ).fetchall() == [], view
        assert _one(
            analyst_a, "SELECT count(*) FROM analyst_recipients WHERE tenant_id = %s", (b.tenant,)
        ) == 0
        assert _one(
            analyst_a, "SELECT count(*) FROM analyst_rejections WHERE event_id = ANY(%s)",
            (b.rejections,),
        ) == 0
        assert _one(
            analyst_a, "SELECT count(*) FROM recipient_attempts WHERE event_id = ANY(%s)",
            (b.attempts,),
        ) == 0
        for table in ("contacts", "contact_list_members", "tenant_daily_sends",
                      "analyst_daily_sends", "analyst_list_counts"):
            assert _one(
                analyst_a, f"SELECT count(*) FROM {table} WHERE tenant_id = %s",  # noqa: S608
                (b.tenant,),
            ) == 0, table
        # No predicate trick widens the view: OR true still goes through the policy.
        assert _one(
            analyst_a, "SELECT count(*) FROM analyst_recipients WHERE tenant_id = %s OR true",
            (b.tenant,),
        ) == len(a.recipients)


def test_no_tenant_set_sees_nothing(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    # Autocommit statements, then an explicit transaction that sets no tenant.
    for view in VIEWS:
        assert _one(analyst_a, f"SELECT count(*) FROM {view}") == 0, view  # noqa: S608
    with analyst_a.transaction():
        assert current_tenant(analyst_a) is None
        for view in VIEWS:
            assert _one(analyst_a, f"SELECT count(*) FROM {view}") == 0, view  # noqa: S608


def test_tenant_does_not_outlive_its_transaction_on_the_same_connection(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with tenant_transaction(analyst_a, a.tenant):
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == len(a.recipients)
    with analyst_a.transaction():
        assert current_tenant(analyst_a) is None
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == 0
    assert _one(analyst_a, "SELECT count(*) FROM analyst_campaign_progress") == 0

    # Rolled back too: the setting goes with the failed transaction.
    with pytest.raises(errors.DivisionByZero), tenant_transaction(analyst_a, a.tenant):
        analyst_a.execute("SELECT 1 / 0")
    assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == 0
    assert current_tenant(analyst_a) is None


def test_a_tenant_not_granted_to_the_login_shows_nothing(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    _, b = tenants
    # The analyst chooses the setting; the grant table decides whether it means anything.
    with analyst_a.transaction():
        analyst_a.execute("SELECT set_config('app.tenant_id', %s, true)", (b.tenant,))
        for view in VIEWS:
            assert _one(analyst_a, f"SELECT count(*) FROM {view}") == 0, view  # noqa: S608
    with tenant_transaction(analyst_a, b.tenant):
        assert _one(analyst_a, "SELECT count(*) FROM campaigns") == 0
    # '*' is a grant, never a tenant an analyst can select.
    with analyst_a.transaction():
        analyst_a.execute("SELECT set_config('app.tenant_id', '*', true)")
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == 0
    # The analyst sees its own grants only.
    grants = analyst_a.execute("SELECT role_name, tenant_id FROM analyst_tenants").fetchall()
    assert [g[1] for g in grants] == [tenants[0].tenant]


def test_a_service_login_for_any_tenant_still_sees_one_tenant_per_transaction(
    logins: Logins, tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, b = tenants
    service = logins.analyst(ANY_TENANT)
    for rows in (b, a):
        with tenant_transaction(service, rows.tenant):
            assert _one(service, "SELECT count(*) FROM analyst_recipients") == len(rows.recipients)
            assert {r[0] for r in service.execute(
                "SELECT DISTINCT tenant_id FROM analyst_recipients")} == {rows.tenant}
    assert _one(service, "SELECT count(*) FROM analyst_recipients") == 0


# --- what an analyst cannot do --------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM send_ledger",
        "SELECT * FROM command_outbox",
        "INSERT INTO command_outcomes (event_id, tenant_id, causation_id, aggregate_id,"
        " event_type, occurred_at) VALUES (gen_random_uuid(), '{a}', gen_random_uuid(), 'c',"
        " 'CampaignCreated', now())",
        "SELECT * FROM projector_positions",
        "SELECT * FROM schema_migrations",
        "SELECT * FROM campaign_progress",
        "INSERT INTO campaigns (tenant_id, campaign_id) VALUES ('{a}', 'camp-x')",
        "UPDATE campaigns SET sent = sent + 1",
        "DELETE FROM campaign_recipients",
        "UPDATE analyst_campaign_progress SET name = 'x'",
        "INSERT INTO analyst_tenants (role_name, tenant_id) VALUES (current_user, '*')",
        "INSERT INTO projector_positions (consumer_group, topic, partition, next_offset)"
        " VALUES ('g', 't', 0, 0)",
        "TRUNCATE campaigns",
        "INSERT INTO tenant_daily_sends (tenant_id, day) VALUES ('{a}', current_date)",
        "UPDATE campaign_throughput SET settled = 0",
        "DELETE FROM contact_list_members",
        "UPDATE contacts SET deleted = true",
        "INSERT INTO recipient_attempts (event_id, tenant_id, campaign_id, contact_id, attempt,"
        " detail, occurred_at) VALUES (gen_random_uuid(), '{a}', 'c', 'k', 1, 'x', now())",
        "ALTER TABLE contacts DISABLE ROW LEVEL SECURITY",
        "DROP POLICY analyst_tenant ON contact_list_members",
        "ALTER VIEW analyst_list_counts SET (security_invoker = false)",
        "SET ROLE campaigns",
        "SET SESSION AUTHORIZATION campaigns",
        "ALTER TABLE campaigns DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE campaigns NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY analyst_tenant ON campaigns",
        "ALTER VIEW analyst_recipients SET (security_invoker = false)",
        "CREATE VIEW analyst_backdoor AS SELECT * FROM campaigns",
        "GRANT campaign_writer TO CURRENT_USER",
    ],
)
def test_analyst_is_refused(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows], statement: str
) -> None:
    a, _ = tenants
    with pytest.raises(errors.InsufficientPrivilege), tenant_transaction(analyst_a, a.tenant):
        analyst_a.execute(statement.replace("{a}", a.tenant))


def test_turning_row_security_off_fails_instead_of_showing_everything(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with pytest.raises(errors.InsufficientPrivilege), tenant_transaction(analyst_a, a.tenant):
        analyst_a.execute("SET LOCAL row_security = off")
        analyst_a.execute("SELECT count(*) FROM analyst_recipients")


def test_set_role_to_the_group_does_not_widen_anything(
    analyst_a: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, _ = tenants
    with tenant_transaction(analyst_a, a.tenant):
        analyst_a.execute("SET LOCAL ROLE campaign_analyst")
        # The grants belong to the login, not to the group.
        assert _one(analyst_a, "SELECT count(*) FROM analyst_recipients") == 0


def test_tenant_ids_are_checked_before_use(analyst_a: psycopg.Connection[Any]) -> None:
    for bad in ("", " ", "a'b", "-x", "x" * 65, "a b", "*", "acme;drop"):
        with pytest.raises(InvalidTenant), tenant_transaction(analyst_a, bad):
            pass  # pragma: no cover - never entered
    with analyst_a.transaction(), pytest.raises(RuntimeError), \
            tenant_transaction(analyst_a, "acme"):
        pass  # pragma: no cover - never entered


# --- writers are unaffected -----------------------------------------------------------------


def test_superuser_still_sees_every_tenant(
    admin: psycopg.Connection[Any], tenants: tuple[TenantRows, TenantRows]
) -> None:
    a, b = tenants
    counts = dict(admin.execute(
        "SELECT tenant_id, count(*) FROM campaign_recipients WHERE tenant_id = ANY(%s)"
        " GROUP BY tenant_id", ([a.tenant, b.tenant],)).fetchall())
    assert counts == {a.tenant: len(a.recipients), b.tenant: len(b.recipients)}


BULK_ROWS = 600


def test_a_writer_login_projects_under_forced_row_security(
    logins: Logins, admin: psycopg.Connection[Any]
) -> None:
    """The production path: a non-superuser in campaign_writer runs the projector's SQL."""
    writer = logins.writer()
    tenant, campaign = f"tenant-{uuid.uuid4().hex[:8]}", f"camp-{uuid.uuid4()}"
    changes = read_models.BatchChanges()
    changes.owners[campaign] = tenant
    changes.campaigns[campaign] = read_models.CampaignChange(
        tenant, campaign, name="Writer test", subject="Hello", created_at=DAY1, total=1,
        hydrated_at=DAY1,
    )
    changes.recipients[(campaign, "c1")] = read_models.RecipientRow(
        tenant, campaign, "c1", "c1@example.com", "sent", 1, None, None, 250, 0, DAY2
    )
    changes.contacts[(tenant, "c1")] = [
        ContactUpserted(contact_id="c1", email="c1@example.com", lists=["l1"])]
    try:
        with writer.transaction():
            completed = batch_writer.apply(writer, changes)
            writer.execute(
                "INSERT INTO send_ledger (campaign_id, contact_id, tenant_id, message_id)"
                " VALUES (%s, 'c1', %s, '<m@test>')", (campaign, tenant))
        assert completed == [(tenant, campaign)]
        row = admin.execute(
            "SELECT status, sent, queued FROM campaigns WHERE campaign_id = %s", (campaign,)
        ).fetchone()
        assert row == ("completed", 1, 1)
        # A backlog-sized batch, through the staging table like every batch (PostgreSQL refuses
        # this login a COPY into a table whose policies apply to it).
        bulk = read_models.BatchChanges()
        bulk.owners[campaign] = tenant
        for i in range(BULK_ROWS):
            bulk.recipients[(campaign, f"b{i}")] = read_models.RecipientRow(
                tenant, campaign, f"b{i}", f"b{i}@example.com", "sent", 1, None, None, 250, 0,
                DAY2)
        with writer.transaction():
            batch_writer.apply(writer, bulk)
        row = admin.execute(
            "SELECT sent, queued FROM campaigns WHERE campaign_id = %s", (campaign,)).fetchone()
        assert row == (BULK_ROWS + 1, BULK_ROWS + 1)
    finally:
        with admin.transaction():
            for table in TENANT_TABLES:
                admin.execute(
                    psycopg.sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
                        psycopg.sql.Identifier(table)),
                    (tenant,),
                )


def test_every_table_with_a_tenant_has_forced_row_security(
    admin: psycopg.Connection[Any],
) -> None:
    """A table added later without its policy would show every tenant to analysts."""
    rows = admin.execute(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relkind = 'r' AND EXISTS ("
        "   SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'"
        "   AND NOT a.attisdropped)").fetchall()
    tables = {name: (enabled, forced) for name, enabled, forced in rows}
    assert set(TENANT_TABLES) <= set(tables)
    assert {name for name, flags in tables.items() if flags != (True, True)} == set()
    views = {r[0]: r[1] for r in admin.execute(
        "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'v'"
        " AND c.relname LIKE 'analyst%'").fetchall()}
    assert set(VIEWS) <= set(views)
    assert all("security_invoker=true" in (options or []) for options in views.values()), views
