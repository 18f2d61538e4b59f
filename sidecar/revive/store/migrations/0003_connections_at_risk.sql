-- 0003_connections_at_risk: grants that still work but are expected to die (issue #7).
--
-- Written once, as the webhook that reports a failed refresh (Nango's auth webhook with
-- success: false) may reach another replica than the one leasing the grant: the mark must be
-- shared through the store, not kept in one sidecar's memory. One mark per connection; a new
-- mark replaces the old one. No token, no provider text beyond a redacted sentence.
-- marked_at: when the connection was first marked for its current reason (kept on re-marking).
-- No foreign key: SQLite enforces none by default, and a mark outlives nothing it points to.

CREATE TABLE connections_at_risk (
    connection_id TEXT PRIMARY KEY,
    reason        TEXT NOT NULL,
    detail        TEXT NOT NULL,
    expires_at    DOUBLE PRECISION,
    marked_at     DOUBLE PRECISION NOT NULL
);
