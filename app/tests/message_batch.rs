//! Group commit of message inserts (`store::batch`), on SQLite and PostgreSQL: inserts
//! submitted together are written in one transaction, each gets its own row back, a
//! second reply to the same message is skipped, an insert into a conversation that is not
//! its user's stores nothing, and a batch with one bad insert stores the others and fails
//! only that one. The conversation counters (kept by a trigger) count every stored
//! message once.

mod common;

use std::sync::Arc;

use common::{test_settings, Backend, TestDb};
use wingman_app::store::{self, Page, Store, StoreResult};

async fn user_message(store: &Arc<dyn Store>, user: i64, conversation: i64, text: &str) -> i64 {
    store
        .insert_message(user, conversation, "user", text, None)
        .await
        .expect("insert user message")
        .expect("a user message is always stored")
        .id
}

fn reply<'a>(
    store: &'a Arc<dyn Store>,
    user: i64,
    conversation: i64,
    to: i64,
    text: &'a str,
) -> impl std::future::Future<Output = StoreResult<Option<store::Message>>> + 'a {
    store.insert_message(user, conversation, "assistant", text, Some(to))
}

async fn inserts_submitted_together_get_their_own_rows_and_a_bad_one_fails_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = test_settings(&db.url);
    let store = store::open(&settings.database).await.expect("open store").store;
    let user = store.create_user("batcher", "x", "Batcher").await.expect("user");
    let other = store.create_user("other", "x", "Other").await.expect("user");
    let u = user.id;
    let conv = store
        .create_conversation(user.id, "batched")
        .await
        .expect("conversation")
        .id;
    let m: Vec<i64> = {
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(user_message(&store, u, conv, &format!("question {i}")).await);
        }
        ids
    };

    // The test runtime has one thread: all three are queued before the writer task runs,
    // so they share one batch. Two replies to m[0]: only one may be stored.
    let (a, b, again) = tokio::join!(
        reply(&store, u, conv, m[0], "answer 0"),
        reply(&store, u, conv, m[1], "answer 1"),
        reply(&store, u, conv, m[0], "answer 0, again"),
    );
    let a = a.expect("reply to m0");
    let again = again.expect("second reply to m0 is not an error");
    assert_eq!(a.as_ref().map(|x| x.content.as_str()), Some("answer 0"));
    assert!(
        again.is_none(),
        "a second reply to the same message was stored: {again:?}"
    );
    let b = b.expect("reply to m1").expect("stored");
    assert_eq!((b.content.as_str(), b.reply_to), ("answer 1", Some(m[1])));

    // Inserts for a conversation that does not exist, or is not the inserting user's,
    // share the batch and store nothing; the others are stored.
    let missing = conv + 1_000_000;
    let (void, foreign, kept) = tokio::join!(
        store.insert_message(u, missing, "user", "into the void", None),
        store.insert_message(other.id, conv, "user", "not mine", None),
        store.insert_message(u, conv, "user", "question 4", None),
    );
    assert!(void.expect("no error").is_none(), "stored into a missing conversation");
    assert!(
        foreign.expect("no error").is_none(),
        "stored into another user's conversation"
    );
    let kept = kept.expect("insert").expect("stored").id;

    // One bad insert (a role the schema refuses): the batch fails as a whole, then its
    // inserts are written one by one.
    let (c, bad, d) = tokio::join!(
        reply(&store, u, conv, m[2], "answer 2"),
        store.insert_message(u, conv, "robot", "beep", None),
        reply(&store, u, conv, m[3], "answer 3"),
    );
    assert!(bad.is_err(), "an insert with a bad role succeeded: {bad:?}");
    let c = c.expect("reply to m2 despite the bad insert").expect("stored");
    let d = d.expect("reply to m3 despite the bad insert").expect("stored");
    assert_eq!((c.reply_to, d.reply_to), (Some(m[2]), Some(m[3])));
    assert!(kept > m[3]);

    let stored = store
        .list_messages(u, conv, Page::After { after: 0, limit: 100 })
        .await
        .expect("list")
        .expect("the user's conversation");
    let texts: Vec<&str> = stored.iter().map(|x| x.content.as_str()).collect();
    assert_eq!(
        texts,
        [
            "question 0",
            "question 1",
            "question 2",
            "question 3",
            "answer 0",
            "answer 1",
            "question 4",
            "answer 2",
            "answer 3"
        ]
    );
    let listed = store.conversation(user.id, conv).await.expect("read").expect("exists");
    assert_eq!(listed.message_count, 9, "every stored message counted once");
    assert_eq!(listed.last_message_id, stored.last().map(|x| x.id));
    assert_eq!(listed.last_message_preview.as_deref(), Some("answer 3"));
    store.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn sqlite_inserts_submitted_together_get_their_own_rows_and_a_bad_one_fails_alone() {
    inserts_submitted_together_get_their_own_rows_and_a_bad_one_fails_alone(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_inserts_submitted_together_get_their_own_rows_and_a_bad_one_fails_alone() {
    inserts_submitted_together_get_their_own_rows_and_a_bad_one_fails_alone(Backend::Postgres).await;
}
