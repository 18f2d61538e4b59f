-- 0001_initial: connections, runs, the action ledger, recovery cases and their incident record.
--
-- Written once for both backends (SQLite and PostgreSQL): only types and syntax both accept.
-- Timestamps are unix seconds as DOUBLE PRECISION (SQLite gives the name REAL affinity): the
-- simplest type both engines store and compare the same way, with no time-zone handling.
-- JSON (evidence, the stored response) is TEXT: opaque to the store, parsed by the caller.
-- No column holds a token: connections keep only a generation and a state (DESIGN §4).
-- Applied inside one transaction by revive.store.migrate; never edit, append 0002_... instead.

CREATE TABLE connections (
    connection_id TEXT PRIMARY KEY,
    generation    INTEGER NOT NULL CHECK (generation >= 1),
    state         TEXT NOT NULL CHECK (state IN ('active', 'dead')),
    updated_at    DOUBLE PRECISION NOT NULL
);

CREATE TABLE runs (
    run_id     TEXT PRIMARY KEY,
    epoch      INTEGER NOT NULL CHECK (epoch >= 1),
    workflow   TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);

-- States are revive.recovery.machine's business, so no CHECK on state here.
CREATE TABLE cases (
    case_id          TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL,
    connection_id    TEXT NOT NULL,
    generation       INTEGER NOT NULL,
    epoch            INTEGER NOT NULL,
    checkpoint_id    TEXT NOT NULL,
    action_key       TEXT NOT NULL,
    idempotency_key  TEXT,
    failure_class    TEXT NOT NULL,
    provider_code    TEXT,
    provider_message TEXT,
    evidence         TEXT NOT NULL,
    state            TEXT NOT NULL,
    version          INTEGER NOT NULL CHECK (version >= 1),
    outcome          TEXT,
    workflow         TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    UNIQUE (run_id, connection_id, generation)
);
CREATE INDEX cases_by_state ON cases (state);
CREATE INDEX cases_by_connection ON cases (connection_id, state);

-- evidence: why an unknown outcome was settled (reconcile's answer or the worker's note).
CREATE TABLE actions (
    idempotency_key TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL,
    action_key      TEXT NOT NULL,
    checkpoint_id   TEXT NOT NULL,
    connection_id   TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    state           TEXT NOT NULL
        CHECK (state IN ('in_flight', 'committed', 'failed', 'not_committed', 'unknown')),
    attempts        INTEGER NOT NULL CHECK (attempts >= 1),
    status          INTEGER,
    response        TEXT,
    case_id         TEXT REFERENCES cases (case_id),
    owner           TEXT NOT NULL,
    evidence        TEXT,
    updated_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX actions_by_run ON actions (run_id, updated_at);
CREATE INDEX actions_by_state ON actions (state);
CREATE INDEX actions_by_owner ON actions (owner, state);

-- seq equals the case version the transition produced: a duplicate is a lost compare-and-set.
CREATE TABLE transitions (
    case_id    TEXT NOT NULL REFERENCES cases (case_id),
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    from_state TEXT,
    to_state   TEXT NOT NULL,
    at         DOUBLE PRECISION NOT NULL,
    actor      TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    PRIMARY KEY (case_id, seq)
);

CREATE TABLE burned_capabilities (
    jti       TEXT PRIMARY KEY,
    case_id   TEXT NOT NULL REFERENCES cases (case_id),
    exp       DOUBLE PRECISION NOT NULL,
    burned_at DOUBLE PRECISION NOT NULL
);
