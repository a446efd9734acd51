-- Recommendations: each user's top-k neighbours, computed in batch by RecommendActor and
-- stored on the user's shard.
--
-- A run writes its rows under a new generation on every shard first; only when every
-- shard holds them does each shard's recommendation_state flip to that generation (one
-- small transaction). Readers only see the generation recommendation_state names, so a
-- run that fails or is interrupted before the flip is never seen, and each user always
-- sees one whole run's results. Rows of other generations are leftovers, deleted after
-- a flip or at the start of the next run.

-- The generation this shard serves (at most one row) and what is known about its run.
CREATE TABLE recommendation_state (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation  bigint NOT NULL,
    computed_at timestamptz NOT NULL,
    users       integer NOT NULL,
    duration_ms bigint NOT NULL,
    k           integer NOT NULL
);

-- One neighbour of one user in one mode. The neighbour's username is copied at compute
-- time (they may live on another shard); `shared` lists the features that made the match.
CREATE TABLE recommendations (
    generation   bigint NOT NULL,
    user_id      uuid NOT NULL,
    mode         text NOT NULL CHECK (mode IN ('similar', 'complementary')),
    rank         smallint NOT NULL,
    neighbour_id uuid NOT NULL,
    username     text NOT NULL,
    score        double precision NOT NULL,
    shared       jsonb NOT NULL,
    PRIMARY KEY (generation, user_id, mode, rank)
);
