-- Every inserted message counts itself into its conversation (count, newest id, latest
-- activity) within the inserting statement: the conversation list needs no aggregate,
-- and a multi-row insert of a group commit needs no UPDATE per conversation.
CREATE FUNCTION messages_count_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversations SET
        message_count   = message_count + 1,
        last_message_id = GREATEST(last_message_id, NEW.id), -- GREATEST skips NULL
        updated_at      = GREATEST(updated_at, NEW.created_at)
    WHERE id = NEW.conversation_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_count_new AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION messages_count_new();
