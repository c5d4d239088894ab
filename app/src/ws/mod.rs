//! WebSocket `/ws`. The token never goes in the URL (proxies log URLs; `?token=` is
//! refused with 400): browsers, which cannot set headers on a WebSocket, send it as a
//! subprotocol, `Sec-WebSocket-Protocol: wingman, wingman.token.<token>`, and the server
//! answers the one it speaks, `wingman` (RFC 6455: the response names a protocol the
//! client offered, never the token); other clients may send `Authorization: Bearer`.
//! A socket ends with its session: at its expiry, and at a logout on any instance
//! (close code 4001: log in again).
//!
//! The [`Hub`] maps users to their local sockets and receives every bus event;
//! each socket has a bounded outbox, and a socket whose outbox is full is dropped
//! (close code 1013) instead of buffering without limit; a write blocked for
//! `ws.send_timeout` drops the socket too. Server pings every
//! `ws.heartbeat_interval`; a client silent for `ws.idle_timeout` is closed. Clients catch
//! up after a reconnect with `{"type":"resume","conversation_id":…,"after":<last id>}`
//! (or `GET …/messages?after=`), answered from the database.
//!
//! Frames the server sends: the bus [`Event`](crate::bus::Event)s as JSON, plus
//! `{"type":"ready","user_id":…}` on connect, `{"type":"pong"}` and `{"type":"error",…}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Envelope, Event};
use crate::http::error::ApiError;
use crate::http::extract::bearer;
use crate::http::sessions::{authenticate, Session};
use crate::http::AppState;
use crate::store::{now_ms, Page, User};

struct Slot {
    id: u64,
    tx: mpsc::Sender<Utf8Bytes>,
    evict: CancellationToken,
    /// The session the socket was opened with, and the signal that it ended.
    token_hash: String,
    revoked: CancellationToken,
}

/// What a registered socket listens to.
struct Registration {
    id: u64,
    outbox: mpsc::Receiver<Utf8Bytes>,
    evict: CancellationToken,
    revoked: CancellationToken,
}

/// This instance's sockets by user.
pub struct Hub {
    sockets: Mutex<HashMap<i64, Vec<Slot>>>,
    next_id: AtomicU64,
    count: AtomicUsize,
    capacity: usize,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        Self {
            sockets: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            capacity,
        }
    }

    pub fn connections(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn register(&self, user_id: i64, token_hash: &str) -> Registration {
        let (tx, outbox) = mpsc::channel(self.capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (evict, revoked) = (CancellationToken::new(), CancellationToken::new());
        if let Ok(mut map) = self.sockets.lock() {
            map.entry(user_id).or_default().push(Slot {
                id,
                tx,
                evict: evict.clone(),
                token_hash: token_hash.to_string(),
                revoked: revoked.clone(),
            });
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("ws_connections").increment(1.0);
        Registration {
            id,
            outbox,
            evict,
            revoked,
        }
    }

    /// Closes the user's sockets of one session (`Some(token_hash)`) or of all of them.
    pub fn revoke(&self, user_id: i64, token_hash: Option<&str>) {
        let Ok(map) = self.sockets.lock() else { return };
        for slot in map.get(&user_id).into_iter().flatten() {
            if token_hash.is_none_or(|h| h == slot.token_hash) {
                slot.revoked.cancel();
            }
        }
    }

    fn unregister(&self, user_id: i64, id: u64) {
        if let Ok(mut map) = self.sockets.lock() {
            if let Some(slots) = map.get_mut(&user_id) {
                slots.retain(|s| s.id != id);
                if slots.is_empty() {
                    map.remove(&user_id);
                }
            }
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("ws_connections").decrement(1.0);
    }

    /// Queues an event on every local socket of its user; full outboxes are evicted.
    pub fn dispatch(&self, env: &Envelope) {
        if matches!(env.event, Event::SessionsRevoked { .. }) {
            return; // between instances only (see `run_dispatcher`)
        }
        let Ok(map) = self.sockets.lock() else { return };
        let Some(slots) = map.get(&env.user_id) else { return };
        let Ok(text) = serde_json::to_string(&env.event) else {
            return;
        };
        let text = Utf8Bytes::from(text);
        for slot in slots {
            match slot.tx.try_send(text.clone()) {
                Ok(()) => metrics::counter!("ws_messages_total", "direction" => "out").increment(1),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics::counter!("ws_send_dropped_total").increment(1);
                    slot.evict.cancel();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// Forwards bus events to the hub (and to the cache for invalidation) until `stop`.
pub async fn run_dispatcher(state: AppState, mut rx: tokio::sync::broadcast::Receiver<Arc<Envelope>>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let next = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            n = rx.recv() => n,
        };
        match next {
            Ok(env) => match &env.event {
                Event::SessionsRevoked { token_hash } => {
                    crate::http::sessions::on_revoked(&state, env.user_id, token_hash.as_deref()).await;
                }
                _ => {
                    state.cache.on_event(&env).await;
                    state.hub.dispatch(&env);
                }
            },
            Err(RecvError::Lagged(n)) => {
                metrics::counter!("bus_events_lagged_total").increment(n);
                tracing::warn!(
                    skipped = n,
                    "event dispatcher lagged; clients will catch up from the database"
                );
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// The subprotocol this server speaks (and answers when the client offers it).
pub const SUBPROTOCOL: &str = "wingman";
/// The subprotocol that carries the bearer token: `wingman.token.<token>`.
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "wingman.token.";

pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let in_url = uri
        .query()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "token"));
    if in_url {
        return Err(ApiError::bad(
            "token",
            "the token does not go in the URL: send Sec-WebSocket-Protocol: wingman, wingman.token.<token> \
             (or Authorization: Bearer <token>)",
        ));
    }
    let offered = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .map(str::to_string);
    let token = offered.or_else(|| bearer(&headers).map(str::to_string));
    let session = authenticate(&state, token.as_deref().unwrap_or("")).await?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("shutting down".into()));
    }
    let max = state.settings.ws.max_message_bytes;
    let tracker = state.ws_tasks.clone();
    Ok(ws
        .protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .max_write_buffer_size(4 * 1024 * 1024)
        .on_upgrade(move |socket| tracker.track_future(handle(state, session, socket)))
        .into_response())
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Ping,
    Resume { conversation_id: i64, after: i64 },
}

/// Close code of a socket whose session ended (logout, expiry): the client logs in again.
pub const SESSION_ENDED: u16 = 4001;

fn close(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// How long until `expires_at` (Unix milliseconds), from now.
fn until(expires_at: i64) -> tokio::time::Instant {
    let left = u64::try_from(expires_at.saturating_sub(now_ms())).unwrap_or(0);
    tokio::time::Instant::now() + std::time::Duration::from_millis(left)
}

async fn handle(state: AppState, session: Session, socket: WebSocket) {
    let user = session.user;
    let Registration {
        id,
        mut outbox,
        evict,
        revoked,
    } = state.hub.register(user.id, &session.token_hash);
    let (mut sink, mut stream) = socket.split();
    let ws = &state.settings.ws;
    // Every write is bounded: a client that stops reading cannot pin this task.
    let limit = ws.send_timeout;
    macro_rules! send {
        ($msg:expr) => {
            matches!(tokio::time::timeout(limit, sink.send($msg)).await, Ok(Ok(())))
        };
    }
    let mut heartbeat = tokio::time::interval(ws.heartbeat_interval);
    heartbeat.tick().await;
    let mut last_seen = Instant::now();
    // The upgrade may have used a cached lookup, and a logout may have run before this
    // socket was registered (its revocation then missed the socket): the database decides.
    let live = match state.store.session_user(&session.token_hash, now_ms()).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            tracing::warn!(error = %e, "session check failed; closing the socket");
            send!(close(1011, "try again later"));
            state.hub.unregister(user.id, id);
            return;
        }
    };
    let mut ok = live;
    if live {
        let hello = json!({ "type": "ready", "user_id": user.id }).to_string();
        ok = send!(WsMessage::Text(hello.into()));
    } else {
        send!(close(SESSION_ENDED, "session ended: log in again"));
    }
    let expiry = tokio::time::sleep_until(until(session.expires_at));
    tokio::pin!(expiry);
    while ok {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                send!(close(1001, "server shutting down"));
                break;
            }
            _ = revoked.cancelled() => {
                send!(close(SESSION_ENDED, "session ended: log in again"));
                break;
            }
            _ = &mut expiry => {
                send!(close(SESSION_ENDED, "session expired: log in again"));
                break;
            }
            _ = evict.cancelled() => {
                send!(close(1013, "slow consumer: reconnect and resume"));
                break;
            }
            out = outbox.recv() => match out {
                Some(text) => ok = send!(WsMessage::Text(text)),
                None => break,
            },
            _ = heartbeat.tick() => {
                if last_seen.elapsed() > ws.idle_timeout {
                    send!(close(1000, "idle timeout"));
                    break;
                }
                ok = send!(WsMessage::Ping(Default::default()));
            }
            incoming = stream.next() => {
                last_seen = Instant::now();
                match incoming {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => break,
                    Some(Ok(WsMessage::Text(text))) => {
                        metrics::counter!("ws_messages_total", "direction" => "in").increment(1);
                        for reply in client_frame(&state, &user, text.as_str()).await {
                            if !send!(WsMessage::Text(reply.into())) {
                                ok = false;
                                break;
                            }
                        }
                    }
                    Some(Ok(_)) => {} // pings are answered by axum; pongs and binary ignored
                }
            }
        }
    }
    state.hub.unregister(user.id, id);
}

/// Answers one client frame.
async fn client_frame(state: &AppState, user: &User, text: &str) -> Vec<String> {
    let err = |m: String| vec![json!({ "type": "error", "message": m }).to_string()];
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return err(format!("bad frame: {e}")),
    };
    match frame {
        ClientFrame::Ping => vec![json!({ "type": "pong" }).to_string()],
        ClientFrame::Resume { conversation_id, after } => {
            let limit = state.settings.limits.max_page;
            match state
                .store
                .list_messages(user.id, conversation_id, Page::After { after, limit })
                .await
            {
                Ok(None) => err("conversation not found".into()),
                Ok(Some(messages)) => {
                    let more = messages.len() == limit as usize;
                    let mut out: Vec<String> = messages
                        .into_iter()
                        .filter_map(|m| serde_json::to_string(&Event::Message { message: m }).ok())
                        .collect();
                    out.push(
                        json!({ "type": "resumed", "conversation_id": conversation_id, "has_more": more }).to_string(),
                    );
                    out
                }
                Err(e) => err(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user_id: i64, seq: u32) -> Envelope {
        Envelope {
            user_id,
            event: Event::Token {
                conversation_id: 1,
                reply_to: 1,
                seq,
                delta: "x".into(),
            },
        }
    }

    #[test]
    fn a_full_outbox_evicts_only_that_socket() {
        let hub = Hub::new(3);
        let slow = hub.register(7, "a");
        let mut fast = hub.register(7, "b");
        let mut other = hub.register(8, "c");
        let (slow_evict, fast_evict, other_evict) = (slow.evict.clone(), fast.evict.clone(), other.evict.clone());
        for seq in 0..3 {
            hub.dispatch(&event(7, seq));
            // the fast consumer keeps up
            assert!(fast.outbox.try_recv().is_ok());
        }
        assert!(!slow_evict.is_cancelled(), "3 queued events fit an outbox of 3");
        hub.dispatch(&event(7, 3));
        assert!(
            slow_evict.is_cancelled(),
            "the 4th event overflows the slow socket's outbox"
        );
        assert!(!fast_evict.is_cancelled());
        assert!(fast.outbox.try_recv().is_ok());
        hub.dispatch(&event(8, 0));
        assert!(other.outbox.try_recv().is_ok(), "other users are unaffected");
        assert!(!other_evict.is_cancelled());
        assert_eq!(hub.connections(), 3);
    }

    #[test]
    fn unregister_removes_the_socket() {
        let hub = Hub::new(2);
        let mut r = hub.register(1, "a");
        hub.unregister(1, r.id);
        assert_eq!(hub.connections(), 0);
        hub.dispatch(&event(1, 0));
        assert!(r.outbox.try_recv().is_err(), "nothing is delivered after unregister");
    }

    #[test]
    fn a_revocation_signals_the_sockets_of_that_session_only() {
        let hub = Hub::new(2);
        let (a1, a2, b) = (hub.register(1, "one"), hub.register(1, "two"), hub.register(2, "one"));
        hub.revoke(1, Some("one"));
        assert!(a1.revoked.is_cancelled());
        assert!(!a2.revoked.is_cancelled(), "another session of the user");
        assert!(!b.revoked.is_cancelled(), "another user's session with the same hash");
        hub.revoke(1, None);
        assert!(
            a2.revoked.is_cancelled(),
            "revoke-all reaches every session of the user"
        );
        assert!(!b.revoked.is_cancelled());
    }
}
