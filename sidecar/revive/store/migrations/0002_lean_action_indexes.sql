-- Every mutating request inserts one action and updates it once. The indexes of 0001 all
-- changed on that update (state, updated_at), so each write touched five b-trees. Lookups by
-- run need no order from the index, and only in_flight / unknown rows are ever searched by
-- state or owner (the start-up sweep, reconcile): a partial index holds just those, and the
-- committed majority never enters it.
DROP INDEX actions_by_run;
DROP INDEX actions_by_state;
DROP INDEX actions_by_owner;
CREATE INDEX actions_by_run ON actions (run_id);
CREATE INDEX actions_open ON actions (owner, state) WHERE state IN ('in_flight', 'unknown');
