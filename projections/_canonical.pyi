"""projections/_canonical.c: the canonical-delivery matcher of projections.fast_decode."""

from projections.facts import RecipientFact

def configure(fact_type: type[RecipientFact], /) -> None: ...
def match(raw: object, /) -> RecipientFact | None: ...  # None unless bytes or str
