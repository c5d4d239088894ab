-- wingman-app schema (PostgreSQL). Timestamps are Unix milliseconds.
CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    display_name  TEXT   NOT NULL,
    created_at    BIGINT NOT NULL
);
-- login and registration look users up by name
CREATE UNIQUE INDEX users_username ON users (username);

CREATE TABLE sessions (
    token_hash TEXT   PRIMARY KEY,             -- auth lookup by token
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id); -- cascade on user delete

CREATE TABLE conversations (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title           TEXT   NOT NULL,
    message_count   BIGINT NOT NULL DEFAULT 0,   -- kept in the same transaction as inserts
    last_message_id BIGINT,                      -- so the list needs no aggregate
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
-- the conversation list: WHERE user_id = $1 ORDER BY updated_at DESC, id DESC
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            TEXT   NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content         TEXT   NOT NULL,
    reply_to        BIGINT,                      -- the user message an assistant reply answers
    created_at      BIGINT NOT NULL
);
-- message pages: WHERE conversation_id = $1 AND id > / < $2 ORDER BY id
CREATE INDEX messages_conversation_id ON messages (conversation_id, id);
-- one reply per user message (makes a retried AI job idempotent)
CREATE UNIQUE INDEX messages_reply_to ON messages (reply_to) WHERE reply_to IS NOT NULL;

CREATE TABLE exports (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    body            TEXT   NOT NULL,
    created_at      BIGINT NOT NULL
);
-- latest export of a conversation
CREATE INDEX exports_conversation ON exports (conversation_id, id DESC);
