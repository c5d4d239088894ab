-- expired sessions are pruned by expiry
CREATE INDEX sessions_expires ON sessions (expires_at);
