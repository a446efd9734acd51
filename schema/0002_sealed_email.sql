-- CosmicSyncCore shard schema, version 2: emails sealed at rest.
--
-- A user's email is stored only sealed (AES-256-GCM, see src/sealing.rs): email_sealed is
-- nonce || ciphertext || tag and email_key the id of the data key that sealed it. The
-- directory's 'email' entries are keyed by a blind index (HMAC of the normalised
-- email), never by the email itself.
--
-- Plaintext emails cannot be sealed in SQL (the key is not in the database), so a shard
-- that already holds users refuses this migration rather than keep them in the clear.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM users) THEN
        RAISE EXCEPTION 'this shard holds users stored before emails were encrypted at rest (schema 0001); '
            'it cannot be upgraded in place: start from an empty database (see docs/SECURITY.md)';
    END IF;
END $$;

ALTER TABLE users DROP COLUMN email;
ALTER TABLE users ADD COLUMN email_key integer NOT NULL;
ALTER TABLE users ADD COLUMN email_sealed bytea NOT NULL;
-- Finds the rows a key rotation still has to re-seal.
CREATE INDEX users_by_email_key ON users (email_key, id);

-- Check values of every key that has sealed data or built the blind index on this shard
-- (key_id 0 is the blind-index key). A node whose key file lacks one of them, or holds a
-- different key under its id, refuses to start instead of failing row by row.
CREATE TABLE key_checks (
    key_id      integer PRIMARY KEY,
    check_value bytea NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now()
);
