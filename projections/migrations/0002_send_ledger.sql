-- The sender's send ledger (services/sender/ledger.py): one row per campaign recipient,
-- claimed before its SMTP transaction and settled with the outcome after it.
CREATE TABLE send_ledger (
    campaign_id text NOT NULL,
    contact_id  text NOT NULL,
    tenant_id   text NOT NULL,
    message_id  text NOT NULL,
    status      text NOT NULL DEFAULT 'claimed' CHECK (status IN ('claimed', 'sent', 'failed')),
    -- How often the recipient reached a sender (1 + redeliveries after crashes/rebalances).
    claims      integer NOT NULL DEFAULT 1,
    -- SMTP transactions over all settled deliveries.
    attempts    integer NOT NULL DEFAULT 0,
    -- Mailings whose outcome was unknown (claimed but never settled, or the connection was
    -- lost after the final "." of DATA): each one is a possible duplicate in the inbox.
    ambiguous   integer NOT NULL DEFAULT 0,
    smtp_code   integer,
    smtp_reply  text,    -- when sent
    reason      text,    -- when failed
    permanent   boolean, -- when failed
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    settled_at  timestamptz,
    PRIMARY KEY (campaign_id, contact_id)
);

-- Claims that were never settled: what an operator (or a later reconciler) looks at.
CREATE INDEX send_ledger_unsettled ON send_ledger (claimed_at) WHERE status = 'claimed';
