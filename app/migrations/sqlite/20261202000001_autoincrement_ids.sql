-- Ids are never reused. Without AUTOINCREMENT, SQLite gives a new row max(id) + 1, so
-- deleting the newest conversation hands its id to the next conversation anyone creates;
-- anything still holding the old id (a cache entry, a queued job, a client's cursor) then
-- points at someone else's row. AUTOINCREMENT keeps the highest id ever used in
-- sqlite_sequence. (PostgreSQL identity columns already never reuse values.)
--
-- SQLite cannot add AUTOINCREMENT to a table, so every table with an integer id is
-- rebuilt, in this one transaction, with its rows, ids and indexes. Foreign keys stay on:
-- the new child tables reference the new parents (`*_new`), and the old tables are
-- dropped children first, so no drop cascades into rows that are kept. Renaming a new
-- table then rewrites the references to it (`conversations_new` -> `conversations`).

CREATE TABLE users_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    display_name  TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);
INSERT INTO users_new (id, username, password_hash, display_name, created_at)
    SELECT id, username, password_hash, display_name, created_at FROM users;

CREATE TABLE sessions_new (
    token_hash TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users_new (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
INSERT INTO sessions_new (token_hash, user_id, created_at, expires_at)
    SELECT token_hash, user_id, created_at, expires_at FROM sessions;

CREATE TABLE conversations_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         INTEGER NOT NULL REFERENCES users_new (id) ON DELETE CASCADE,
    title           TEXT    NOT NULL,
    message_count   INTEGER NOT NULL DEFAULT 0,
    last_message_id INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
INSERT INTO conversations_new (id, user_id, title, message_count, last_message_id, created_at, updated_at)
    SELECT id, user_id, title, message_count, last_message_id, created_at, updated_at FROM conversations;

CREATE TABLE messages_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations_new (id) ON DELETE CASCADE,
    role            TEXT    NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content         TEXT    NOT NULL,
    reply_to        INTEGER,
    created_at      INTEGER NOT NULL
);
-- (the counter trigger lives on the old table: the copied rows are not counted again)
INSERT INTO messages_new (id, conversation_id, role, content, reply_to, created_at)
    SELECT id, conversation_id, role, content, reply_to, created_at FROM messages;

CREATE TABLE exports_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations_new (id) ON DELETE CASCADE,
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
);
INSERT INTO exports_new (id, conversation_id, body, created_at)
    SELECT id, conversation_id, body, created_at FROM exports;

-- children first: each dropped table is referenced by no table any more
DROP TABLE exports;
DROP TABLE messages; -- drops the counter trigger with it
DROP TABLE conversations;
DROP TABLE sessions;
DROP TABLE users;

ALTER TABLE users_new RENAME TO users;
ALTER TABLE sessions_new RENAME TO sessions;
ALTER TABLE conversations_new RENAME TO conversations;
ALTER TABLE messages_new RENAME TO messages;
ALTER TABLE exports_new RENAME TO exports;

-- the indexes of 20261127000001_init.sql
CREATE UNIQUE INDEX users_username ON users (username);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC);
CREATE INDEX messages_conversation_id ON messages (conversation_id, id);
CREATE UNIQUE INDEX messages_reply_to ON messages (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX exports_conversation ON exports (conversation_id, id DESC);
-- expired sessions are pruned by expiry
CREATE INDEX sessions_expires ON sessions (expires_at);

-- the trigger of 20261127000002_message_counter_trigger.sql
CREATE TRIGGER messages_count_new AFTER INSERT ON messages
BEGIN
    UPDATE conversations SET
        message_count   = message_count + 1,
        last_message_id = max(coalesce(last_message_id, NEW.id), NEW.id),
        updated_at      = max(updated_at, NEW.created_at)
    WHERE id = NEW.conversation_id;
END;
