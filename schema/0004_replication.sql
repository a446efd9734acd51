-- CosmicSyncCore shard schema, version 4: replication between nodes.
--
-- Every replicated row keeps, beside its columns (the visible values), the stamp of each
-- value: the write that set it (node and that node's counter for the row) and its
-- hybrid-logical-clock time (see src/replication/rules.rs). `hlc` is the newest of them:
-- when the row last changed, the order reconciliation walks rows in.
ALTER TABLE users ADD COLUMN stamps jsonb NOT NULL DEFAULT '{}', ADD COLUMN hlc bigint NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN stamps jsonb NOT NULL DEFAULT '{}', ADD COLUMN hlc bigint NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN stamps jsonb NOT NULL DEFAULT '{}', ADD COLUMN hlc bigint NOT NULL DEFAULT 0;

-- A change applied from another node is logged under this node's sequence number with its
-- origin; the origin's own sequence number is known only for changes that came straight
-- from it by gossip (0 otherwise), so (origin, origin_seq) is no longer unique.
ALTER TABLE changes DROP CONSTRAINT changes_origin_origin_seq_key;
CREATE INDEX changes_by_row ON changes (row_id, seq);
-- Conflicts a change brought to light (shown on the WebSocket with the change).
ALTER TABLE changes ADD COLUMN conflicts jsonb;

-- Concurrent writes of one field: the losing value of each, beside the value that wins
-- it. Open while the row still holds the losing value; resolved once a write that saw it
-- (the owner choosing a value) supersedes it. The losing values are part of the row's
-- replicated state: a row's open conflicts travel with it.
CREATE TABLE conflicts (
    entity         text NOT NULL,
    row_id         uuid NOT NULL,
    owner_id       uuid NOT NULL,
    field          text NOT NULL,
    loser_node     text NOT NULL,
    loser_counter  bigint NOT NULL,
    loser_hlc      bigint NOT NULL,
    loser_value    jsonb NOT NULL,
    winner_node    text NOT NULL,
    winner_counter bigint NOT NULL,
    winner_hlc     bigint NOT NULL,
    winner_value   jsonb NOT NULL,
    detected_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    PRIMARY KEY (row_id, field, loser_node, loser_counter)
);
CREATE INDEX conflicts_open ON conflicts (row_id) WHERE resolved_at IS NULL;
CREATE INDEX conflicts_by_owner ON conflicts (owner_id, detected_at, row_id, field, loser_node, loser_counter);

-- Row states from peers that cannot be stored yet: a profile or project whose user has
-- not arrived. Kept on the owner's shard (where the row will live) and applied in the
-- transaction that brings the user. Never holds a user row (users depend on nothing).
CREATE TABLE pending_states (
    entity      text NOT NULL,
    row_id      uuid NOT NULL,
    owner_id    uuid NOT NULL,
    state       jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, row_id)
);
CREATE INDEX pending_by_owner ON pending_states (owner_id);

-- Users from other nodes whose username or email another user already holds on this
-- node: kept (they can log in by their other unique name, and everything else of theirs
-- replicates), and listed here until the name is free or changed.
CREATE TABLE name_clashes (
    kind        text NOT NULL,
    key         text NOT NULL,
    user_id     uuid NOT NULL,
    holder_id   uuid NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key, user_id)
);
