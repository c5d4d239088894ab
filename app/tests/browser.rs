//! The web page in a real headless Chromium (Debian's `chromium`), driven over the
//! DevTools protocol: what a person sees logged out, logged in without a conversation,
//! while a reply streams in, after the socket was cut, and after logging out
//! (`WINGMAN_SCREENSHOT_DIR=dir` saves a screenshot of each state). Needs
//! `apt-get install -y chromium` (fails clearly without it).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMsg;
use wingman_app::Options;

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(WsMsg::Text(
                json!({"id": id, "method": method, "params": params}).to_string().into(),
            ))
            .await
            .expect("cdp send");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("cdp reply")
                .expect("open")
                .expect("frame");
            if let WsMsg::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method} failed: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is truthy (bounded).
    async fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.eval(expr).await == json!(true) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn launch(url: &str) -> (Browser, Cdp) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1100,700",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium on PATH (apt-get install -y chromium)");
    let stderr = tokio::process::ChildStderr::from_std(child.stderr.take().expect("stderr")).expect("async stderr");
    let browser = Browser {
        child,
        _profile: profile,
    };
    let mut lines = BufReader::new(stderr).lines();
    let ws_url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("DevTools listening on ") {
                return rest.trim().to_string();
            }
        }
        panic!("chromium exited without a DevTools endpoint");
    })
    .await
    .expect("DevTools endpoint within 30s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let port = ws_url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .expect("port")
        .to_string();
    // the page target chromium opened for `url`
    let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
        .await
        .expect("targets")
        .json()
        .await
        .expect("json");
    let page = targets
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["type"] == "page")
        .expect("a page target")
        .clone();
    let (ws, _) = tokio_tungstenite::connect_async(page["webSocketDebuggerUrl"].as_str().expect("ws url"))
        .await
        .expect("cdp connect");
    (browser, Cdp { ws, next: 0 })
}

/// Whether the element with `id` takes up room on the page: neither it nor an ancestor
/// is `display: none` (a `hidden` attribute that CSS overrides does not count).
fn shown(id: &str) -> String {
    format!(
        "(() => {{ const e = document.getElementById('{id}'); if (!e) return false; \
         const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0 && \
         getComputedStyle(e).visibility !== 'hidden'; }})()"
    )
}

/// Asserts which elements a person sees and which not.
async fn assert_view(cdp: &mut Cdp, state: &str, visible: &[&str], invisible: &[&str]) {
    for id in visible {
        assert_eq!(cdp.eval(&shown(id)).await, json!(true), "{state}: #{id} is not shown");
    }
    for id in invisible {
        assert_eq!(cdp.eval(&shown(id)).await, json!(false), "{state}: #{id} is shown");
    }
}

/// Saves a screenshot as `wingman-<name>.png` when `WINGMAN_SCREENSHOT_DIR` is set.
async fn screenshot(cdp: &mut Cdp, name: &str) {
    if let Ok(dir) = std::env::var("WINGMAN_SCREENSHOT_DIR") {
        let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64_shim::decode(shot["data"].as_str().expect("png data"));
        std::fs::write(format!("{dir}/wingman-{name}.png"), png).expect("write screenshot");
    }
}

/// The message ids the page shows, in page order.
async fn page_ids(cdp: &mut Cdp) -> Vec<i64> {
    let v = cdp
        .eval("[...document.querySelectorAll('#messages .msg[data-id]')].map(e => +e.dataset.id)")
        .await;
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

/// The conversation's message ids on the server.
async fn server_ids(app: &TestApp, token: &str, conv: i64) -> Vec<i64> {
    let (_, v) = app.list_messages(token, conv).await;
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_i64().expect("id"))
        .collect()
}

const CHAT_SHELL: &[&str] = &["chat", "sidebar", "logout", "new-conv", "composer"];
const LOGIN_FORM: &[&str] = &["auth", "username", "password", "login", "register"];

/// What a person sees, state by state: the login form alone; the empty chat after
/// registering; their message and the reply streaming in, then stored; the page
/// catching up without loss or duplicates after its socket was cut while messages
/// arrived; and the login form again after logging out (the token revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_each_state_of_the_chat_page() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.llm.token_delay = Duration::from_millis(60);
    let app = TestApp::start(settings, Options::default()).await;
    let (_browser, mut cdp) = launch(&app.url("/")).await;
    cdp.call("Runtime.enable", json!({})).await;
    cdp.wait_for(
        "the login form",
        "document.readyState === 'complete' && !!document.getElementById('register')",
    )
    .await;

    // 1. logged out: the login form, and nothing of the chat
    assert_view(&mut cdp, "logged out", LOGIN_FORM, CHAT_SHELL).await;
    screenshot(&mut cdp, "1-logged-out").await;

    // 2. registered, no conversation yet
    cdp.eval("document.getElementById('username').value = 'webuser'; document.getElementById('password').value = 'a long password'; document.getElementById('register').click(); true").await;
    cdp.wait_for("the chat view", &shown("chat")).await;
    cdp.wait_for(
        "the socket",
        "document.getElementById('status').textContent === 'connected'",
    )
    .await;
    assert_view(
        &mut cdp,
        "no conversation",
        &[CHAT_SHELL, &["empty", "no-conversations"]].concat(),
        LOGIN_FORM,
    )
    .await;
    assert_eq!(cdp.eval("document.getElementById('me').textContent").await, "webuser");
    assert_eq!(
        cdp.eval("document.querySelectorAll('#conversations li').length").await,
        0
    );
    screenshot(&mut cdp, "2-no-conversation").await;

    // 3. a message, and the reply streaming in
    cdp.eval("document.getElementById('input').value = 'hello from a real browser, tell me about the weather on Mars'; document.getElementById('composer').requestSubmit(); true").await;
    cdp.wait_for(
        "the user message",
        "[...document.querySelectorAll('.msg.user')].some(e => e.textContent.startsWith('hello from a real browser'))",
    )
    .await;
    cdp.wait_for(
        "part of the reply, streaming",
        "[...document.querySelectorAll('.msg.assistant.streaming')].some(e => e.textContent.length > 0)",
    )
    .await;
    assert_view(
        &mut cdp,
        "streaming",
        &["messages", "composer"],
        &["empty", "no-conversations", "auth"],
    )
    .await;
    screenshot(&mut cdp, "3-streaming").await;
    cdp.wait_for(
        "the streamed reply, stored",
        "document.querySelectorAll('.msg.streaming').length === 0 && [...document.querySelectorAll('.msg.assistant')].some(e => e.textContent.includes('hello from a real browser'))",
    )
    .await;
    cdp.wait_for(
        "the conversation in the list",
        "document.querySelectorAll('#conversations li').length === 1",
    )
    .await;
    screenshot(&mut cdp, "4-reply").await;

    // 4. the socket is cut; meanwhile another session of the same person posts, and the
    // reply is stored; once the socket is back the page shows all of it, once
    let token = cdp
        .eval("localStorage.getItem('wingman.token')")
        .await
        .as_str()
        .expect("token")
        .to_string();
    let conv = cdp.eval("current").await.as_i64().expect("current conversation");
    // (the network is down for the page's sockets: they go to a closed port)
    cdp.eval(
        "window.RealWebSocket = WebSocket; \
         WebSocket = class extends RealWebSocket { constructor(url, p) { super('ws://127.0.0.1:9/ws', p); } }; \
         socket.close(); true",
    )
    .await;
    cdp.wait_for(
        "the page to notice",
        "document.getElementById('status').textContent.startsWith('reconnecting')",
    )
    .await;
    let other = app.login_with("webuser", "a long password").await;
    let mut ws = app.ws(&other).await;
    let posted = app.post_message(&other, conv, "sent from my phone").await;
    await_reply(&mut ws, posted["message"]["id"].as_i64().expect("id")).await;
    let on_server = server_ids(&app, &token, conv).await;
    assert_eq!(on_server.len(), 4);
    assert_eq!(
        page_ids(&mut cdp).await.len(),
        2,
        "the page got messages without its socket"
    );
    cdp.eval("WebSocket = RealWebSocket; true").await;
    cdp.wait_for(
        "the page to catch up",
        "document.querySelectorAll('#messages .msg[data-id]').length >= 4",
    )
    .await;
    cdp.wait_for(
        "the socket again",
        "document.getElementById('status').textContent === 'connected'",
    )
    .await;
    assert_eq!(
        page_ids(&mut cdp).await,
        on_server,
        "lost, duplicated or misordered messages"
    );
    screenshot(&mut cdp, "5-caught-up").await;

    // 5. logging out ends the session on the server too
    cdp.eval("document.getElementById('logout').click(); true").await;
    cdp.wait_for("the login form again", &shown("auth")).await;
    assert_view(&mut cdp, "logged out again", LOGIN_FORM, CHAT_SHELL).await;
    let (s, _) = app.call("GET", "/api/me", Some(&token), None).await;
    assert_eq!(s, 401, "the page's token still works after logging out");
    assert_eq!(cdp.eval("localStorage.getItem('wingman.token')").await, Value::Null);
    screenshot(&mut cdp, "6-logged-out-again").await;

    // 6. logged in again, the session is ended elsewhere (log out everywhere, from
    // another session): the page's socket is closed and it shows the login form
    cdp.eval(
        "document.getElementById('password').value = 'a long password'; document.getElementById('login').click(); true",
    )
    .await;
    cdp.wait_for(
        "the socket",
        "document.getElementById('status').textContent === 'connected'",
    )
    .await;
    let (s, _) = app.call("POST", "/api/logout?all=1", Some(&other), None).await;
    assert_eq!(s, 204);
    cdp.wait_for("the login form after the session ended", &shown("auth"))
        .await;
    assert_view(&mut cdp, "session ended elsewhere", LOGIN_FORM, CHAT_SHELL).await;
    let said = cdp.eval("document.getElementById('auth-error').textContent").await;
    assert!(said.as_str().is_some_and(|t| t.contains("session has ended")), "{said}");
    screenshot(&mut cdp, "7-session-ended").await;
    app.stop().await;
}

/// Minimal base64 decoding for the optional screenshot (no extra dependency).
mod base64_shim {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
        bytes
            .chunks(4)
            .flat_map(|c| {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (i, v)| acc | (u32::from(*v) << (18 - 6 * i)));
                let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
                out.into_iter().take(c.len().saturating_sub(1))
            })
            .collect()
    }
}
