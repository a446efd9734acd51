-- CosmicSyncCore shard schema, version 1.
-- Applied to every shard at start (see actors/shard/migrate.rs). Every shard holds the
-- same tables; which rows it holds follows from the placement key in their ids.

-- Users placed on this shard. email and password_hash never leave the node.
CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    username            text NOT NULL,
    email               text NOT NULL,
    password_hash       text NOT NULL,
    profile_id          uuid NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    password_changed_at timestamptz NOT NULL,
    vclock              jsonb NOT NULL
);

-- One profile per user, on the user's shard.
CREATE TABLE profiles (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL UNIQUE REFERENCES users (id),
    name       text NOT NULL DEFAULT '',
    bio        text NOT NULL DEFAULT '',
    skills     text[] NOT NULL DEFAULT '{}',
    interests  text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    vclock     jsonb NOT NULL
);

-- Projects, on their creator's shard. A delete leaves a tombstone (deleted_at and a
-- bumped clock) so a replicated delete can never be undone by an older update.
CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    creator_id  uuid NOT NULL REFERENCES users (id),
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    tags        text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    deleted_at  timestamptz,
    vclock      jsonb NOT NULL
);
CREATE INDEX projects_by_creator ON projects (creator_id, id) WHERE deleted_at IS NULL;
CREATE INDEX projects_live ON projects (id) WHERE deleted_at IS NULL;

-- The unique-name directory: (kind, key) -> user. An entry lives on the shard its key
-- hashes to, not necessarily its user's shard; cross-shard changes use two-phase commit.
CREATE TABLE directory (
    kind    text NOT NULL CHECK (kind IN ('username', 'email')),
    key     text NOT NULL,
    user_id uuid NOT NULL,
    PRIMARY KEY (kind, key)
);

-- Outcomes of cross-shard transactions whose commit point is this shard. A prepared
-- participant is committed iff its transaction has a 'commit' row here.
CREATE TABLE tx_decisions (
    txid       uuid PRIMARY KEY,
    outcome    text NOT NULL CHECK (outcome IN ('commit', 'abort')),
    decided_at timestamptz NOT NULL DEFAULT now()
);

-- The change log: one entry per committed write, in the same transaction as the row.
CREATE TABLE changes (
    seq          bigint PRIMARY KEY,
    origin       text NOT NULL,
    origin_seq   bigint NOT NULL,
    entity       text NOT NULL,
    op           text NOT NULL,
    row_id       uuid NOT NULL,
    owner_id     uuid NOT NULL,
    vclock       jsonb NOT NULL,
    data         jsonb NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (origin, origin_seq)
);

-- Revoked access tokens of users on this shard, kept until they expire.
CREATE TABLE revoked_tokens (
    jti        uuid PRIMARY KEY,
    user_id    uuid NOT NULL,
    expires_at timestamptz NOT NULL
);
