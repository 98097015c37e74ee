-- Quota leases. Each edge process serves an account's tokens only from its lease, drawn from
-- the account's pool for the month in one transaction that holds the pool row; the pool never
-- leases more than the quota, so a fleet never delivers more than the quota.
CREATE TABLE quota_pools (
    account_id TEXT NOT NULL,
    month      TEXT NOT NULL,
    -- Tokens leased out this month (and the ledger's total when the pool opened).
    leased     BIGINT NOT NULL,
    PRIMARY KEY (account_id, month)
);
CREATE TABLE quota_leases (
    account_id TEXT NOT NULL,
    month      TEXT NOT NULL,
    -- One edge process: its edge id and a suffix of the process's own.
    holder     TEXT NOT NULL,
    granted    BIGINT NOT NULL,
    used       BIGINT NOT NULL,
    renewed_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, month, holder)
);
CREATE INDEX quota_leases_renewed ON quota_leases (renewed_at);
-- Reservations in flight were the fleet's quota bound before leases.
DROP TABLE fleet_reservations;
