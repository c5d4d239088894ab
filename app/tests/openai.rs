//! The OpenAI-compatible streaming client against a small fake chat-completions server
//! (axum, SSE) started on 127.0.0.1 in each test, and the full app flow with it.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use wingman_app::config::{LlmSettings, Provider};
use wingman_app::llm::openai::OpenAiCompatible;
use wingman_app::llm::{ChatMessage, ChatModel, ChatRequest, LlmError};
use wingman_app::Options;

#[derive(Clone)]
enum Behaviour {
    Status(u16),
    /// Stream these deltas, then `[DONE]`, or break the connection after them.
    Stream {
        deltas: Vec<&'static str>,
        cut: bool,
    },
    /// Send headers, then nothing.
    Hang,
}

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Behaviour>>,
    requests: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<String>>,
}

fn sse(delta: &str) -> Bytes {
    let chunk =
        json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": delta}}]});
    Bytes::from(format!("data: {chunk}\n\n"))
}

async fn completions(State(fake): State<Arc<Fake>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    fake.requests.fetch_add(1, Ordering::SeqCst);
    fake.bodies.lock().expect("lock").push(body);
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        fake.auth.lock().expect("lock").push(a.to_string());
    }
    let next = fake.script.lock().expect("lock").pop_front();
    let behaviour = next.unwrap_or(Behaviour::Stream {
        deltas: vec!["Hel", "lo", " world"],
        cut: false,
    });
    let sse_headers = [("content-type", "text/event-stream")];
    match behaviour {
        Behaviour::Status(code) => (StatusCode::from_u16(code).expect("status"), "upstream says no").into_response(),
        Behaviour::Hang => (
            sse_headers,
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()),
        )
            .into_response(),
        Behaviour::Stream { deltas, cut } => {
            // a role-only first chunk, like the real API
            let mut items: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            ))];
            items.extend(deltas.iter().map(|d| Ok(sse(d))));
            let head = futures::stream::iter(items);
            if cut {
                // the connection drops a moment after the tokens went out (mid-stream failure)
                let tail = futures::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err::<Bytes, _>(std::io::Error::other("connection reset"))
                });
                (sse_headers, Body::from_stream(head.chain(tail))).into_response()
            } else {
                let done = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from("data: [DONE]\n\n"))]);
                (sse_headers, Body::from_stream(head.chain(done))).into_response()
            }
        }
    }
}

async fn start_fake(script: Vec<Behaviour>) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        script: Mutex::new(script.into()),
        ..Default::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), fake)
}

fn settings(base: &str) -> LlmSettings {
    LlmSettings {
        provider: Provider::Openai,
        base_url: base.to_string(),
        model: "fake-model".into(),
        api_key: "sk-test".into(),
        first_token_timeout: Duration::from_millis(500),
        max_attempts: 3,
        ..LlmSettings::default()
    }
}

fn prompt() -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
    }
}

#[tokio::test]
async fn streams_tokens_and_retries_only_before_the_first_token() {
    let (base, fake) = start_fake(vec![
        Behaviour::Status(503),
        Behaviour::Stream {
            deltas: vec!["Hel", "lo", " world"],
            cut: false,
        },
    ])
    .await;
    let client = OpenAiCompatible::new(&settings(&base)).expect("client");
    let tokens: Vec<String> = client
        .stream(prompt())
        .await
        .expect("stream")
        .map(|t| t.expect("token"))
        .collect()
        .await;
    assert_eq!(tokens, vec!["Hel", "lo", " world"]);
    assert_eq!(fake.requests.load(Ordering::SeqCst), 2, "one retry after the 503");
    let body = fake.bodies.lock().expect("lock")[0].clone();
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["messages"][0]["content"], "hi");
    assert_eq!(fake.auth.lock().expect("lock")[0], "Bearer sk-test");
}

#[tokio::test]
async fn a_break_after_the_first_token_is_reported_not_retried() {
    let (base, fake) = start_fake(vec![Behaviour::Stream {
        deltas: vec!["partial"],
        cut: true,
    }])
    .await;
    let client = OpenAiCompatible::new(&settings(&base)).expect("client");
    let items: Vec<Result<String, LlmError>> = client.stream(prompt()).await.expect("stream").collect().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().expect("first token"), "partial");
    assert!(items[1].is_err());
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1, "no retry once a token is out");
}

#[tokio::test]
async fn client_errors_are_not_retried_and_server_errors_give_up_after_max_attempts() {
    let (base, fake) = start_fake(vec![Behaviour::Status(400)]).await;
    let client = OpenAiCompatible::new(&settings(&base)).expect("client");
    match client.stream(prompt()).await {
        Err(LlmError::Status { status: 400, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a 400 must fail"),
    }
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1);

    let (base, fake) = start_fake(vec![
        Behaviour::Status(500),
        Behaviour::Status(502),
        Behaviour::Status(503),
    ])
    .await;
    let client = OpenAiCompatible::new(&settings(&base)).expect("client");
    assert!(matches!(
        client.stream(prompt()).await,
        Err(LlmError::Status { status: 503, .. })
    ));
    assert_eq!(fake.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_silent_server_times_out_before_the_first_token() {
    let (base, fake) = start_fake(vec![Behaviour::Hang, Behaviour::Hang]).await;
    let mut s = settings(&base);
    s.max_attempts = 2;
    s.first_token_timeout = Duration::from_millis(200);
    let client = OpenAiCompatible::new(&s).expect("client");
    assert!(matches!(
        client.stream(prompt()).await,
        Err(LlmError::FirstTokenTimeout(_))
    ));
    assert_eq!(fake.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_streams_an_openai_reply_over_websocket_and_persists_it() {
    let (base, fake) = start_fake(vec![Behaviour::Status(429)]).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut s = test_settings(&db.url);
    s.llm = settings(&base);
    let app = TestApp::start(s, Options::default()).await;
    let (token, _) = app.register("oscar").await;
    let conv = app.new_conversation(&token, "real model").await;
    let mut ws = app.ws(&token).await;
    let id = app.post_message(&token, conv, "tell me something").await["message"]["id"]
        .as_i64()
        .expect("id");
    let (streamed, last) = await_reply(&mut ws, id).await;
    assert_eq!(streamed, "Hello world");
    assert_eq!(last["content"], "Hello world");
    assert_eq!(fake.requests.load(Ordering::SeqCst), 2, "429 retried once");
    assert_eq!(
        fake.bodies.lock().expect("lock")[1]["messages"][0]["content"],
        "tell me something"
    );
    let (_, v) = app.list_messages(&token, conv).await;
    assert_eq!(v["messages"][1]["content"], "Hello world");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_mid_reply_keeps_the_partial_text_and_reports_it() {
    let (base, _fake) = start_fake(vec![Behaviour::Stream {
        deltas: vec!["Half", " an"],
        cut: true,
    }])
    .await;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut s = test_settings(&db.url);
    s.llm = settings(&base);
    let app = TestApp::start(s, Options::default()).await;
    let (token, _) = app.register("partial").await;
    let conv = app.new_conversation(&token, "cut").await;
    let mut ws = app.ws(&token).await;
    let id = app.post_message(&token, conv, "go").await["message"]["id"]
        .as_i64()
        .expect("id");
    let frames = ws
        .until(|v| v["type"] == "message" && v["message"]["reply_to"] == id)
        .await;
    assert!(
        frames
            .iter()
            .any(|v| v["type"] == "reply_failed" && v["reply_to"] == id),
        "no reply_failed event: {frames:?}"
    );
    let last = frames.last().expect("final");
    assert_eq!(last["message"]["content"], "Half an [reply interrupted]");
    app.stop().await;
}
