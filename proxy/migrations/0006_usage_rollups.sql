-- The ledger's new shape (issue 18): what the store writes grows with active keys, not with
-- requests.
--
-- usage_rollups: the totals per key, agent, edge and minute; reports read them. A shipment
-- adds to one row per (key, agent, minute) it holds, whatever the number of requests.
CREATE TABLE usage_rollups (
    account_id        TEXT NOT NULL,
    month             TEXT NOT NULL,      -- YYYY-MM, UTC
    minute            BIGINT NOT NULL,    -- unix seconds at the minute's start
    key_id            TEXT NOT NULL,
    agent_id          TEXT NOT NULL,
    edge_id           TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    estimated         BIGINT NOT NULL,    -- requests whose counts the edge estimated
    PRIMARY KEY (account_id, month, minute, key_id, agent_id, edge_id)
);

-- How far each journal stream is counted. A stream is one journal segment of one edge process
-- (named by its first row's id), its position a byte offset; a shipment moves it forward in
-- the transaction that writes its rows, so a replay after a crash counts nothing twice
-- without a unique index over every request.
CREATE TABLE usage_streams (
    stream     TEXT PRIMARY KEY,
    edge_id    TEXT NOT NULL,
    shipped    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One row per metered request, appended for audit and support (`store.request_rows`): found
-- by the x-request-id the client holds. No other index, no uniqueness: the streams above make
-- each row arrive once.
CREATE TABLE usage_requests (
    request_id        TEXT NOT NULL,      -- the edge's own id: edge, process start, pid, counter
    client_request_id TEXT NOT NULL,
    edge_id           TEXT NOT NULL,
    account_id        TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    agent_id          TEXT NOT NULL,
    month             TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    estimated         INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX usage_requests_client_request ON usage_requests(client_request_id);

INSERT INTO usage_rollups (account_id, month, minute, key_id, agent_id, edge_id, requests,
                           prompt_tokens, completion_tokens, total_tokens, estimated)
    SELECT account_id, month, created_at - created_at % 60, key_id, agent_id, edge_id, COUNT(*),
           SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(estimated)
    FROM usage_ledger
    GROUP BY account_id, month, created_at - created_at % 60, key_id, agent_id, edge_id;

INSERT INTO usage_requests (request_id, client_request_id, edge_id, account_id, key_id, agent_id,
                            month, prompt_tokens, completion_tokens, total_tokens, estimated,
                            outcome, created_at)
    SELECT request_id, client_request_id, edge_id, account_id, key_id, agent_id, month,
           prompt_tokens, completion_tokens, total_tokens, estimated, outcome, created_at
    FROM usage_ledger;

DROP TABLE usage_ledger;
