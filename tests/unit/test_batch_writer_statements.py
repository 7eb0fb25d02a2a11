"""batch_writer's statements agree with the rows they are fed (no database)."""

from __future__ import annotations

import re

from projections import batch_writer
from projections.read_models import RecipientRow


def test_the_staging_copy_names_recipient_rows_fields_in_order() -> None:
    match = re.search(r"COPY recipient_stage \(([^)]*)\)", batch_writer._COPY_STAGE)
    assert match is not None
    columns = tuple(name.strip() for name in match.group(1).split(","))
    assert columns == RecipientRow._fields
    assert len(batch_writer._STAGE_TYPES) == len(columns)


def test_each_statement_is_whole() -> None:
    """No fragment to splice: every statement starts with its own verb."""
    for name in ("_RECIPIENTS", "_CAMPAIGN_FACTS", "_STATUS", "_ENSURE_CAMPAIGNS"):
        text = getattr(batch_writer, name).lstrip()
        assert text.split()[0] in {"WITH", "UPDATE", "INSERT", "SELECT"}, name
        assert "{" not in text, name
