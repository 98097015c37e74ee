-- Running totals of the ledger per account, month and edge, kept in the same transaction as
-- the ledger rows: reading a month's use is then a read of a few rows, not a scan of the month.
CREATE TABLE usage_totals (
    account_id   TEXT NOT NULL,
    month        TEXT NOT NULL,
    edge_id      TEXT NOT NULL,
    total_tokens BIGINT NOT NULL,
    PRIMARY KEY (account_id, month, edge_id)
);
INSERT INTO usage_totals (account_id, month, edge_id, total_tokens)
    SELECT account_id, month, edge_id, SUM(total_tokens) FROM usage_ledger GROUP BY account_id, month, edge_id;
