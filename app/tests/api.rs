//! The REST + WebSocket API suite, run against SQLite and against PostgreSQL.

mod common;

use common::*;
use serde_json::json;
use wingman_app::Options;

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

both_backends!(
    users_register_login_profile,
    bad_input_gets_clear_errors,
    conversations_crud_and_list_preview,
    users_cannot_see_each_others_data,
    messages_paginate_with_cursors,
    websocket_streams_ai_reply_and_persists_it,
    websocket_resume_catches_up_from_database,
    heavy_export_job_runs,
    cache_headers_and_cache_invalidation,
    operations_endpoints,
);

async fn start(backend: Backend) -> (TestApp, TestDb) {
    let db = TestDb::new(backend).await;
    let app = TestApp::start(test_settings(&db.url), Options::default()).await;
    (app, db)
}

async fn finish(app: TestApp, db: TestDb) {
    app.stop().await;
    db.drop_db().await;
}

async fn users_register_login_profile(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, id) = app.register("alice").await;

    let (s, v) = app.call("GET", "/api/me", Some(&token), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["user"]["username"], "alice");
    assert_eq!(v["user"]["id"], id);

    let (s, v) = app
        .call(
            "POST",
            "/api/users",
            None,
            Some(json!({"username": "alice", "password": "another password"})),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["field"], "username");

    let (s, _) = app
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"username": "alice", "password": "wrong password"})),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"username": "nobody", "password": "wrong password"})),
        )
        .await;
    assert_eq!(s, 401);
    let (s, v) = app
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"username": "alice", "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let token2 = v["token"].as_str().expect("token").to_string();
    assert_ne!(token, token2);

    let (s, v) = app
        .call(
            "PATCH",
            "/api/me",
            Some(&token2),
            Some(json!({"display_name": "Alice A."})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["user"]["display_name"], "Alice A.");

    let (s, v) = app.call("GET", "/api/me", None, None).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, _) = app.call("GET", "/api/me", Some("not-a-real-token"), None).await;
    assert_eq!(s, 401);
    finish(app, db).await;
}

async fn bad_input_gets_clear_errors(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("bob").await;
    let conv = app.new_conversation(&token, "t").await;
    let path = format!("/api/conversations/{conv}/messages");

    let (s, v) = app.raw("POST", &path, Some(&token), "{\"content\": ").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_request");

    let (s, v) = app.raw("POST", &path, Some(&token), "{}").await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "content");

    let (s, v) = app.raw("POST", &path, Some(&token), "{\"content\": 5}").await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "content");

    let (s, v) = app
        .call("POST", &path, Some(&token), Some(json!({"content": "   "})))
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "content");

    let big = "x".repeat(16 * 1024 + 1);
    let (s, v) = app
        .call("POST", &path, Some(&token), Some(json!({ "content": big })))
        .await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["field"], "content");

    // A body over limits.max_body_bytes: announce 2 MiB, send a bit more than the limit and
    // stop, so the 413 is read deterministically (a client still writing could see a reset).
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"content\": \"yyyy",
        2 * 1024 * 1024
    );
    let reply = raw_http(&app, &(head + &"y".repeat(1024 * 1024 + 64 * 1024))).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"code\":\"too_large\""), "{reply}");

    let (s, v) = app
        .call(
            "PATCH",
            &format!("/api/conversations/{conv}"),
            Some(&token),
            Some(json!({"title": 7})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "title");

    let (s, v) = app
        .call(
            "POST",
            "/api/users",
            None,
            Some(json!({"username": "x", "password": "long enough pw"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "username");
    let (s, v) = app
        .call(
            "POST",
            "/api/users",
            None,
            Some(json!({"username": "carol", "password": "short"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "password");

    let (s, v) = app
        .call("GET", "/api/conversations/abc/messages", Some(&token), None)
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "id");
    let (s, v) = app.call("GET", &format!("{path}?limit=0"), Some(&token), None).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "limit");
    let (s, v) = app.call("GET", &format!("{path}?after=zz"), Some(&token), None).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "after");

    let (s, _) = app
        .call("GET", "/api/conversations/999999/messages", Some(&token), None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .call(
            "POST",
            "/api/conversations/999999/messages",
            Some(&token),
            Some(json!({"content": "hi"})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app.call("GET", "/no/such/route", None, None).await;
    assert_eq!(s, 404);

    // nothing above created a message
    let (s, v) = app.call("GET", &path, Some(&token), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"].as_array().expect("array").len(), 0);
    finish(app, db).await;
}

async fn conversations_crud_and_list_preview(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, uid) = app.register("dora").await;
    let a = app.new_conversation(&token, "first").await;
    let b = app.new_conversation(&token, "second").await;
    let c = app.new_conversation(&token, "third").await;
    let mut ws = app.ws(&token).await;
    let mut posted = Vec::new();
    for (conv, text) in [(a, "hello from a"), (a, "again a"), (b, "only b")] {
        posted.push(
            app.post_message(&token, conv, text).await["message"]["id"]
                .as_i64()
                .expect("id"),
        );
    }
    for id in posted {
        await_reply(&mut ws, id).await; // replies land in any order; wait for all three
    }

    let (s, v) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(s, 200);
    let list = v["conversations"].as_array().expect("array");
    assert_eq!(list.len(), 3);
    // most recently active first; `c` has no messages, so it is last
    let keys: Vec<(i64, i64)> = list
        .iter()
        .map(|c| (c["updated_at"].as_i64().expect("t"), c["id"].as_i64().expect("id")))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(keys, sorted, "not ordered by activity: {v}");
    assert_eq!(list[2]["id"], c);
    let by_id = |id: i64| list.iter().find(|x| x["id"] == id).expect("listed").clone();
    assert_eq!(by_id(a)["user_id"], uid);
    assert_eq!(by_id(a)["message_count"], 4, "2 messages + 2 replies: {v}");
    assert_eq!(by_id(b)["message_count"], 2);
    assert_eq!(by_id(b)["last_message_role"], "assistant");
    assert!(by_id(b)["last_message_preview"]
        .as_str()
        .expect("preview")
        .contains("only b"));
    assert_eq!(by_id(c)["message_count"], 0);
    assert!(by_id(c)["last_message_preview"].is_null());

    let (s, v) = app.call("GET", "/api/conversations?limit=1", Some(&token), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["conversations"].as_array().expect("array").len(), 1);

    let (s, v) = app
        .call(
            "PATCH",
            &format!("/api/conversations/{c}"),
            Some(&token),
            Some(json!({"title": "renamed"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["conversation"]["title"], "renamed");
    let (s, v) = app
        .call("GET", &format!("/api/conversations/{c}"), Some(&token), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["conversation"]["title"], "renamed");

    let (s, _) = app
        .call("DELETE", &format!("/api/conversations/{a}"), Some(&token), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .call("DELETE", &format!("/api/conversations/{a}"), Some(&token), None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .call("GET", &format!("/api/conversations/{a}/messages"), Some(&token), None)
        .await;
    assert_eq!(s, 404);
    // (its owner was cached by the posts above: the delete dropped that too)
    let (s, v) = app
        .call(
            "POST",
            &format!("/api/conversations/{a}/messages"),
            Some(&token),
            Some(json!({"content": "too late"})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (_, v) = app.call("GET", "/api/conversations", Some(&token), None).await;
    let ids: Vec<i64> = v["conversations"]
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["id"].as_i64().expect("id"))
        .collect();
    assert!(!ids.contains(&a) && ids.contains(&b) && ids.contains(&c), "{ids:?}");
    finish(app, db).await;
}

async fn users_cannot_see_each_others_data(backend: Backend) {
    let (app, db) = start(backend).await;
    let (alice, _) = app.register("alice2").await;
    let (mallory, _) = app.register("mallory").await;
    let conv = app.new_conversation(&alice, "secret plans").await;
    app.post_message(&alice, conv, "the secret").await;

    let (_, v) = app.call("GET", "/api/conversations", Some(&mallory), None).await;
    assert_eq!(v["conversations"].as_array().expect("array").len(), 0);
    for (method, path, body) in [
        ("GET", format!("/api/conversations/{conv}"), None),
        ("GET", format!("/api/conversations/{conv}/messages"), None),
        (
            "POST",
            format!("/api/conversations/{conv}/messages"),
            Some(json!({"content": "hi"})),
        ),
        (
            "PATCH",
            format!("/api/conversations/{conv}"),
            Some(json!({"title": "mine"})),
        ),
        ("DELETE", format!("/api/conversations/{conv}"), None),
        ("POST", format!("/api/conversations/{conv}/export"), None),
        ("GET", format!("/api/conversations/{conv}/export"), None),
    ] {
        let (s, v) = app.call(method, &path, Some(&mallory), body).await;
        assert_eq!(s, 404, "{method} {path}: {v}");
        assert!(!v.to_string().contains("secret"), "{v}");
    }
    // the WebSocket resume does not leak either
    let mut ws = app.ws(&mallory).await;
    ws.send_json(json!({"type": "resume", "conversation_id": conv, "after": 0}))
        .await;
    let v = ws.next_json().await;
    assert_eq!(v["type"], "error", "{v}");

    // alice still has everything
    let (s, v) = app
        .call("GET", &format!("/api/conversations/{conv}"), Some(&alice), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["conversation"]["title"], "secret plans");
    finish(app, db).await;
}

async fn messages_paginate_with_cursors(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("erin").await;
    let messages: Vec<_> = (0..120)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("m{i}")}))
        .collect();
    let (s, v) = app
        .call(
            "POST",
            "/api/conversations/import",
            Some(&token),
            Some(json!({"title": "imported", "messages": messages})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["conversation"]["message_count"], 120);
    assert_eq!(v["conversation"]["last_message_preview"], "m119");
    let conv = v["conversation"]["id"].as_i64().expect("id");
    let path = format!("/api/conversations/{conv}/messages");

    // newest page first, ascending inside
    let (_, v) = app.call("GET", &path, Some(&token), None).await;
    let page = v["messages"].as_array().expect("array");
    assert_eq!(page.len(), 50);
    assert_eq!(v["has_more"], true);
    assert_eq!(page[49]["content"], "m119");
    assert_eq!(page[0]["content"], "m70");

    // walk back with `before`, then forward with `after`: every message exactly once
    let mut seen: Vec<String> = page
        .iter()
        .map(|m| m["content"].as_str().expect("c").to_string())
        .collect();
    let mut before = page[0]["id"].as_i64().expect("id");
    loop {
        let (_, v) = app
            .call("GET", &format!("{path}?before={before}&limit=30"), Some(&token), None)
            .await;
        let page = v["messages"].as_array().expect("array");
        let mut chunk: Vec<String> = page
            .iter()
            .map(|m| m["content"].as_str().expect("c").to_string())
            .collect();
        chunk.extend(seen);
        seen = chunk;
        if v["has_more"] == false {
            break;
        }
        before = page[0]["id"].as_i64().expect("id");
    }
    let want: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want);

    let mut after = 0;
    let mut forward = Vec::new();
    loop {
        let (_, v) = app
            .call("GET", &format!("{path}?after={after}&limit=45"), Some(&token), None)
            .await;
        let page = v["messages"].as_array().expect("array");
        forward.extend(page.iter().map(|m| m["content"].as_str().expect("c").to_string()));
        if v["has_more"] == false {
            break;
        }
        after = page.last().expect("last")["id"].as_i64().expect("id");
    }
    assert_eq!(forward, want);

    let (s, v) = app
        .call(
            "POST",
            "/api/conversations/import",
            Some(&token),
            Some(json!({"title": "bad", "messages": [{"role": "robot", "content": "x"}]})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "messages[0].role");
    finish(app, db).await;
}

async fn websocket_streams_ai_reply_and_persists_it(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("frank").await;
    let conv = app.new_conversation(&token, "chat").await;
    let mut ws = app.ws(&token).await;

    let posted = app.post_message(&token, conv, "what is the weather like on Mars").await;
    assert_eq!(posted["reply_queued"], true);
    let user_msg = posted["message"]["id"].as_i64().expect("id");

    let (streamed, final_msg) = await_reply(&mut ws, user_msg).await;
    assert!(streamed.contains("what is the weather like on Mars"), "{streamed}");
    assert_eq!(final_msg["role"], "assistant");
    assert_eq!(final_msg["content"].as_str().expect("content"), streamed);

    let (_, v) = app.list_messages(&token, conv).await;
    let msgs = v["messages"].as_array().expect("array");
    assert_eq!(msgs.len(), 2, "{v}");
    assert_eq!(msgs[0]["id"], user_msg);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["reply_to"], user_msg);
    assert_eq!(msgs[1]["content"].as_str().expect("c"), streamed);

    // ping/pong over the socket, and a bad frame gets an error, not a disconnect
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        ws.until(|v| v["type"] == "pong").await.last().expect("pong")["type"],
        "pong"
    );
    ws.send_json(json!({"type": "nonsense"})).await;
    assert_eq!(
        ws.until(|v| v["type"] == "error").await.last().expect("err")["type"],
        "error"
    );

    // unauthenticated upgrades are refused
    let err = tokio_tungstenite::connect_async(format!("{}/ws", app.ws_base))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("401"), "{err}");
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}/ws", app.ws_base).into_client_request().expect("request");
    req.headers_mut()
        .insert("authorization", "Bearer bogus".parse().expect("header"));
    let err = tokio_tungstenite::connect_async(req).await.expect_err("must fail");
    assert!(err.to_string().contains("401"), "{err}");
    finish(app, db).await;
}

async fn websocket_resume_catches_up_from_database(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("gina").await;
    let conv = app.new_conversation(&token, "offline").await;
    // messages posted while no socket is connected
    let first = app.post_message(&token, conv, "one").await["message"]["id"]
        .as_i64()
        .expect("id");
    app.post_message(&token, conv, "two").await;

    let mut ws = app.ws(&token).await;
    ws.send_json(json!({"type": "resume", "conversation_id": conv, "after": first}))
        .await;
    let frames = ws.until(|v| v["type"] == "resumed").await;
    let contents: Vec<&str> = frames
        .iter()
        .filter(|v| v["type"] == "message" && v["message"]["role"] == "user")
        .filter_map(|v| v["message"]["content"].as_str())
        .collect();
    assert!(contents.contains(&"two"), "{frames:?}");
    assert!(
        !contents.contains(&"one"),
        "resume must start after the cursor: {frames:?}"
    );
    finish(app, db).await;
}

async fn heavy_export_job_runs(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("hank").await;
    let messages: Vec<_> = (0..40)
        .map(|i| json!({"role": "user", "content": format!("banana apple {i}")}))
        .collect();
    let (_, v) = app
        .call(
            "POST",
            "/api/conversations/import",
            Some(&token),
            Some(json!({"title": "fruit", "messages": messages})),
        )
        .await;
    let conv = v["conversation"]["id"].as_i64().expect("id");
    let mut ws = app.ws(&token).await;
    let (s, _) = app
        .call("GET", &format!("/api/conversations/{conv}/export"), Some(&token), None)
        .await;
    assert_eq!(s, 404, "no export yet");
    let (s, v) = app
        .call("POST", &format!("/api/conversations/{conv}/export"), Some(&token), None)
        .await;
    assert_eq!(s, 202, "{v}");
    ws.until(|v| v["type"] == "export_ready" && v["conversation_id"] == conv)
        .await;
    let (s, v) = app
        .call("GET", &format!("/api/conversations/{conv}/export"), Some(&token), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let summary = &v["export"]["summary"];
    assert_eq!(summary["messages"], 40);
    assert_eq!(summary["top_words"][0][0], "apple");
    assert_eq!(summary["top_words"][0][1], 40);
    assert_eq!(summary["sha256"].as_str().expect("digest").len(), 64);
    finish(app, db).await;
}

async fn cache_headers_and_cache_invalidation(backend: Backend) {
    let (app, db) = start(backend).await;
    let (token, _) = app.register("ivy").await;
    let conv = app.new_conversation(&token, "c").await;

    let r = app
        .http
        .get(app.url("/api/conversations"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    assert!(r.headers()["cache-control"]
        .to_str()
        .expect("hdr")
        .starts_with("private"));
    let r = app.http.get(app.url("/static/app.js")).send().await.expect("asset");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-control"]
        .to_str()
        .expect("hdr")
        .contains("public, max-age="));
    let r = app.http.get(app.url("/api/info")).send().await.expect("info");
    assert!(r.headers()["cache-control"]
        .to_str()
        .expect("hdr")
        .starts_with("public, max-age"));

    // the list is served from the cache and invalidated by writes
    let (_, v1) = app.call("GET", "/api/conversations", Some(&token), None).await;
    let (_, v2) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(v1, v2);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("cache_requests_total{cache=\"moka\",result=\"hit\"}"),
        "no cache hit counted"
    );
    assert!(
        metrics.contains("cache_requests_total{cache=\"moka\",result=\"miss\"}"),
        "no cache miss counted"
    );
    app.post_message(&token, conv, "fresh").await;
    let (_, v3) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert!(
        v3["conversations"][0]["message_count"].as_i64().expect("count") >= 1,
        "stale cache: {v3}"
    );
    app.call(
        "PATCH",
        &format!("/api/conversations/{conv}"),
        Some(&token),
        Some(json!({"title": "new title"})),
    )
    .await;
    let (_, v4) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(v4["conversations"][0]["title"], "new title");
    finish(app, db).await;
}

async fn operations_endpoints(backend: Backend) {
    let (app, db) = start(backend).await;
    let (s, v) = app.call("GET", "/healthz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["database"], "ok");
    assert_eq!(v["redis"], "disabled");
    let (token, _) = app.register("jack").await;
    let conv = app.new_conversation(&token, "m").await;
    let mut ws = app.ws(&token).await;
    let id = app.post_message(&token, conv, "metrics please").await["message"]["id"]
        .as_i64()
        .expect("id");
    await_reply(&mut ws, id).await;
    let m = app.metrics().await;
    for needle in [
        "http_server_request_duration_seconds_bucket{method=\"POST\",route=\"/api/conversations/{id}/messages\",status=\"201\",le=\"0.005\"}",
        "db_pool_connections{state=\"idle\"",
        "db_pool_connections{state=\"in_use\"",
        "ws_connections_active{",
        "jobs_queue_depth{queue=\"ai\"",
        "jobs_queue_depth{queue=\"heavy\"",
        "job_duration_seconds_bucket{queue=\"ai\",outcome=\"ok\"",
        "llm_time_to_first_token_seconds_bucket{provider=\"offline\"",
        "cache_requests_total{",
        "db_message_batch_size_bucket{le=\"1\"}",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}");
    }
    let html = app
        .http
        .get(app.url("/"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(html.contains("/static/app.js"));
    finish(app, db).await;
}

/// `/metrics` is not on the public listener (the edge routes everything there to the
/// app): it is served on its own listener, loopback by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_their_own_listener_never_the_public_one() {
    let (app, db) = start(Backend::Sqlite).await;
    let (s, _) = app.call("GET", "/metrics", None, None).await;
    assert_eq!(s, 404, "the public listener serves /metrics");
    let text = app.metrics().await;
    assert!(text.contains("http_server_request_duration_seconds"), "{text}");
    // and the metrics listener serves nothing else
    let r = app
        .http
        .get(format!("{}/api/info", app.metrics_base))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    finish(app, db).await;
}
