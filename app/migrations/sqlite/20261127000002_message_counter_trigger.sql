-- Every inserted message counts itself into its conversation (count, newest id, latest
-- activity) within the inserting statement: the conversation list needs no aggregate,
-- and a multi-row insert of a group commit needs no UPDATE per conversation.
CREATE TRIGGER messages_count_new AFTER INSERT ON messages
BEGIN
    UPDATE conversations SET
        message_count   = message_count + 1,
        last_message_id = max(coalesce(last_message_id, NEW.id), NEW.id),
        updated_at      = max(updated_at, NEW.created_at)
    WHERE id = NEW.conversation_id;
END;
