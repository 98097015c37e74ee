-- The id the client was given for the request (its x-request-id), so that support can answer
-- "was this request billed, and for how much?" from the id the client holds. Not unique (a
-- client may send its own ids); request_id stays the key that makes a replay count once.
ALTER TABLE usage_ledger ADD COLUMN client_request_id TEXT NOT NULL DEFAULT '';
CREATE INDEX usage_ledger_client_request ON usage_ledger(client_request_id);
