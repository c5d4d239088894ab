//! The web page in a real headless Chromium (Debian's `chromium`), driven over the
//! DevTools protocol: a person registers through the form, sends a message, and sees
//! the streamed AI reply. Needs `apt-get install -y chromium` (fails clearly without it).

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_registers_and_chats_in_the_browser() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.llm.token_delay = Duration::from_millis(15);
    let app = TestApp::start(settings, Options::default()).await;
    let (_browser, mut cdp) = launch(&app.url("/")).await;
    cdp.call("Runtime.enable", json!({})).await;
    cdp.wait_for(
        "the login form",
        "document.readyState === 'complete' && !!document.getElementById('register')",
    )
    .await;

    cdp.eval("document.getElementById('username').value = 'webuser'; document.getElementById('password').value = 'a long password'; document.getElementById('register').click(); true").await;
    cdp.wait_for("the chat view", "!document.getElementById('chat').hidden")
        .await;
    assert_eq!(cdp.eval("document.getElementById('me').textContent").await, "webuser");

    cdp.eval("document.getElementById('input').value = 'hello from a real browser'; document.getElementById('composer').requestSubmit(); true").await;
    cdp.wait_for(
        "the user message",
        "[...document.querySelectorAll('.msg.user')].some(e => e.textContent === 'hello from a real browser')",
    )
    .await;
    cdp.wait_for(
        "the streamed reply, persisted",
        "[...document.querySelectorAll('.msg.assistant:not(.streaming)')].some(e => e.textContent.includes('hello from a real browser'))",
    )
    .await;
    // the sidebar shows the conversation with the reply as its preview
    cdp.wait_for(
        "the conversation list",
        "document.querySelectorAll('#conversations li').length === 1",
    )
    .await;

    if let Ok(dir) = std::env::var("WINGMAN_SCREENSHOT_DIR") {
        use base64_shim::decode;
        let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = decode(shot["data"].as_str().expect("png data"));
        std::fs::write(format!("{dir}/wingman-chat.png"), png).expect("write screenshot");
    }
    // and the server has both messages
    let (s, v) = app
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"username": "webuser", "password": "a long password"})),
        )
        .await;
    assert_eq!(s, 200);
    let token = v["token"].as_str().expect("token").to_string();
    let (_, v) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(v["conversations"][0]["message_count"], 2, "{v}");
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
