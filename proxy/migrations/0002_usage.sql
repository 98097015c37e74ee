-- The usage ledger: one row per finished request, written from each edge's local journal.
-- request_id is the edge's own unique id, so replaying a journal never counts twice.
CREATE TABLE usage_ledger (
    request_id        TEXT PRIMARY KEY,
    edge_id           TEXT NOT NULL,
    account_id        TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    agent_id          TEXT NOT NULL,
    month             TEXT NOT NULL,      -- YYYY-MM, UTC
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    estimated         INTEGER NOT NULL,   -- 1 when the runtime reported no usage
    outcome           TEXT NOT NULL,      -- ok, client_closed, upstream_error, quota_exceeded, ...
    created_at        BIGINT NOT NULL
);
CREATE INDEX usage_ledger_account_month ON usage_ledger(account_id, month);

-- What each edge is doing right now, shared so that limits hold across a fleet.
CREATE TABLE fleet_rates (
    edge_id    TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    requests   BIGINT NOT NULL,   -- the edge's sliding one-minute request count for the key
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (edge_id, key_id)
);

CREATE TABLE fleet_reservations (
    edge_id    TEXT NOT NULL,
    account_id TEXT NOT NULL,
    month      TEXT NOT NULL,
    reserved   BIGINT NOT NULL,   -- tokens reserved by requests in flight on the edge
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (edge_id, account_id, month)
);
