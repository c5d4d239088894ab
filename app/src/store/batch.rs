//! Group commit for message inserts.
//!
//! Every message the app stores (a user's post together with its AI job, an assistant
//! reply) goes through the store's one [`MessageWriter`]. Its task takes whatever inserts
//! have queued up while the previous batch was being written and writes them in ONE
//! transaction with ONE multi-row `INSERT … RETURNING` (the conversation counters are kept
//! by a trigger, see the migrations) plus the jobs of the posts. Under load, N inserts cost
//! one transaction instead of N; alone, an insert costs what it did before.
//!
//! On SQLite, where one writer holds the file at a time, this is what bounds the write
//! rate; on PostgreSQL it turns N commits into one. Inserts are sorted by conversation so
//! that batches of two instances lock conversation rows in the same order.
//!
//! A batch that fails is retried insert by insert, so one bad insert (its conversation was
//! deleted meanwhile, say) fails alone and the others are stored; when the database is
//! unreachable, every insert of the batch fails at once instead. A caller that gives up
//! waiting (a request timeout) does not cancel its insert: it may still be stored, as a
//! commit that raced the timeout could be before.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Message, StoreError, StoreResult};

/// Most inserts in one batch (6 bind parameters each: SQLite allows 32,766 per statement).
pub const MAX_BATCH: usize = 256;

/// One message to insert.
pub struct NewMessageOp {
    /// Whose conversation it must be: the insert stores nothing otherwise.
    pub user_id: i64,
    pub conversation_id: i64,
    pub role: String,
    pub content: String,
    /// The user message an assistant reply answers; a second reply to it is not stored.
    pub reply_to: Option<i64>,
    pub created_at: i64,
    /// A job to enqueue in the same transaction, built from the new message's id.
    pub job: Option<JobSpec>,
}

/// A job to enqueue together with a message.
pub struct JobSpec {
    pub queue: String,
    pub encode: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
}

impl NewMessageOp {
    /// Whether `row` is the message this insert stored.
    fn is_row(&self, row: &Message) -> bool {
        row.conversation_id == self.conversation_id
            && row.reply_to == self.reply_to
            && row.created_at == self.created_at
            && row.role == self.role
            && row.content == self.content
    }
}

/// A database's writer pool, as the batching task holds it.
pub struct PoolWriter<DB: sqlx::Database>(pub sqlx::Pool<DB>);

/// Writes a batch of inserts in one transaction (implemented per database).
#[async_trait]
pub trait WriteMessages: Send + Sync + 'static {
    /// Inserts all of `ops` in one transaction, with their jobs. Result `i` is the message
    /// stored for `ops[i]`, or `None` when its conversation is not its user's (or is gone)
    /// or its `reply_to` already had a reply. Fails as a whole: on error nothing of the
    /// batch is stored.
    async fn write_batch(&self, ops: &[&NewMessageOp]) -> StoreResult<Vec<Option<Message>>>;
}

/// Pairs the rows an `INSERT … RETURNING` gave back with the inserts that made them
/// (neither database promises that RETURNING keeps the order of the VALUES list).
/// An insert with no row was skipped (`ON CONFLICT DO NOTHING`, or not its user's).
pub fn match_rows(ops: &[&NewMessageOp], rows: Vec<Message>) -> Vec<Option<Message>> {
    let mut out: Vec<Option<Message>> = (0..ops.len()).map(|_| None).collect();
    for (k, row) in rows.into_iter().enumerate() {
        // rows come back in VALUES order in practice: try that position first
        let slot = if k < ops.len() && out[k].is_none() && ops[k].is_row(&row) {
            Some(k)
        } else {
            (0..ops.len()).find(|&i| out[i].is_none() && ops[i].is_row(&row))
        };
        if let Some(i) = slot {
            out[i] = Some(row);
        }
    }
    out
}

struct Pending {
    op: NewMessageOp,
    done: oneshot::Sender<StoreResult<Option<Message>>>,
}

/// The handle inserts are submitted through; its task runs until every handle is dropped.
#[derive(Debug, Clone)]
pub struct MessageWriter {
    queue: mpsc::Sender<Pending>,
}

fn writer_gone(op: &'static str) -> StoreError {
    StoreError::Unavailable {
        op,
        source: sqlx::Error::WorkerCrashed,
    }
}

impl MessageWriter {
    /// Starts the batching task on the current runtime.
    pub fn spawn<W: WriteMessages>(writer: W) -> Self {
        let (queue, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(writer, rx));
        Self { queue }
    }

    /// Queues `op` and waits until its batch is committed (or failed).
    pub async fn write(&self, op: NewMessageOp) -> StoreResult<Option<Message>> {
        let (done, result) = oneshot::channel();
        self.queue
            .send(Pending { op, done })
            .await
            .map_err(|_| writer_gone("insert_message"))?;
        result.await.map_err(|_| writer_gone("insert_message"))?
    }
}

async fn run<W: WriteMessages>(writer: W, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        batch.sort_by_key(|p| p.op.conversation_id);
        let ops: Vec<&NewMessageOp> = batch.iter().map(|p| &p.op).collect();
        metrics::histogram!("db_message_batch_size").record(ops.len() as f64);
        let outcome = writer.write_batch(&ops).await;
        drop(ops);
        match outcome {
            Ok(rows) => {
                for (p, row) in batch.drain(..).zip(rows) {
                    let _ = p.done.send(Ok(row));
                }
            }
            Err(e) if e.is_unavailable() => {
                // The database is unreachable: one by one, each insert would fail the same
                // way after its own acquire timeout, holding up every write queued behind.
                let detail = e.to_string();
                let mut first = Some(e);
                for p in batch.drain(..) {
                    let error = first.take().unwrap_or_else(|| StoreError::Unavailable {
                        op: "insert_message",
                        source: sqlx::Error::Protocol(detail.clone()),
                    });
                    let _ = p.done.send(Err(error));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(p) = batch.pop() {
                    let _ = p.done.send(Err(e));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, inserts = batch.len(), "message batch failed; writing its inserts one by one");
                for p in batch.drain(..) {
                    let one = writer.write_batch(&[&p.op]).await.map(|mut rows| rows.pop().flatten());
                    let _ = p.done.send(one);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(conversation_id: i64, reply_to: Option<i64>, content: &str) -> NewMessageOp {
        NewMessageOp {
            user_id: 1,
            conversation_id,
            role: "user".into(),
            content: content.into(),
            reply_to,
            created_at: 7,
            job: None,
        }
    }

    fn row(id: i64, o: &NewMessageOp) -> Message {
        Message {
            id,
            conversation_id: o.conversation_id,
            role: o.role.clone(),
            content: o.content.clone(),
            reply_to: o.reply_to,
            created_at: o.created_at,
        }
    }

    #[test]
    fn rows_in_any_order_find_their_inserts_and_a_skipped_insert_gets_none() {
        let (a, b, c) = (op(1, None, "a"), op(2, Some(9), "b"), op(3, None, "c"));
        let ops = [&a, &b, &c];
        // b conflicted (no row); a and c came back in reverse order
        let got = match_rows(&ops, vec![row(11, &c), row(10, &a)]);
        let ids: Vec<Option<i64>> = got.iter().map(|m| m.as_ref().map(|m| m.id)).collect();
        assert_eq!(ids, vec![Some(10), None, Some(11)]);
    }

    #[test]
    fn identical_inserts_each_get_their_own_row() {
        let (a, b) = (op(1, None, "same"), op(1, None, "same"));
        let got = match_rows(&[&a, &b], vec![row(5, &a), row(6, &b)]);
        let ids: Vec<Option<i64>> = got.iter().map(|m| m.as_ref().map(|m| m.id)).collect();
        assert_eq!(ids, vec![Some(5), Some(6)]);
    }
}
