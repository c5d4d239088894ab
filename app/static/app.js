// Wingman chat page: register/login/logout, conversations, streaming replies over /ws.
//
// The page shows one of two views (the `hidden` attribute; style.css makes it win over
// the views' own display). The socket carries the token as a subprotocol, never in the
// URL. After a dropped socket the page reconnects with backoff and catches up from the
// server (a `resume` from the last message it shows); messages are keyed by id and kept
// in id order, so a message that arrives twice (live and in the catch-up) shows once.
"use strict";
const $ = (id) => document.getElementById(id);
let token = localStorage.getItem("wingman.token");
let current = null;       // the open conversation's id
let lastId = {};          // conversation id -> highest message id shown (the resume cursor)
let socket = null;
let retry = 500;
let reconnect = null;     // the pending reconnect timer
let listQueued = false;   // a conversation list reload is scheduled

function status(text) { $("status").textContent = text; }

function showView(view) {
  $("auth").hidden = view !== "auth";
  $("chat").hidden = view !== "chat";
}

// Which part of the thread shows: the messages of the open conversation, or the
// "no conversation" hint.
function showThread() {
  $("messages").hidden = current === null;
  $("empty").hidden = current !== null;
}

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = "Bearer " + token;
  const res = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (res.status === 401 && path !== "/api/login") endSession("Your session has ended: log in again.");
  if (!res.ok) {
    const e = (data && data.error) || {};
    throw new Error((e.field ? e.field + ": " : "") + (e.message || res.statusText));
  }
  return data;
}

async function auth(register) {
  $("auth-error").textContent = "";
  const body = { username: $("username").value.trim(), password: $("password").value };
  try {
    const data = await api("POST", register ? "/api/users" : "/api/login", body);
    token = data.token;
    localStorage.setItem("wingman.token", token);
    $("password").value = "";
    await enter();
  } catch (e) { $("auth-error").textContent = e.message; }
}

// Forgets the session on this page and shows the login form (the server side is the
// caller's business: logout() revokes it, a 401 or close 4001 says it already ended).
function endSession(message) {
  token = null;
  localStorage.removeItem("wingman.token");
  clearTimeout(reconnect);
  if (socket) { const s = socket; socket = null; s.onclose = null; s.close(); }
  current = null; lastId = {};
  $("messages").innerHTML = ""; $("conversations").innerHTML = ""; $("me").textContent = "";
  status("");
  showView("auth");
  $("auth-error").textContent = message || "";
}

async function logout() {
  const t = token;
  endSession();
  // revoke the token on the server (every instance drops it and closes its sockets)
  if (t) await fetch("/api/logout", { method: "POST", headers: { authorization: "Bearer " + t } }).catch(() => {});
}

async function enter() {
  const me = await api("GET", "/api/me");
  $("me").textContent = me.user.display_name;
  current = null;
  showThread();
  showView("chat");
  connect();
  await loadConversations();
}

async function loadConversations() {
  const data = await api("GET", "/api/conversations");
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of data.conversations) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.className = c.id === current ? "active" : "";
    li.textContent = c.title;
    const small = document.createElement("small");
    small.textContent = c.last_message_preview || "no messages yet";
    li.appendChild(small);
    li.onclick = () => open(c.id);
    ul.appendChild(li);
  }
  $("no-conversations").hidden = data.conversations.length > 0;
  if (current === null && data.conversations.length) await open(data.conversations[0].id);
}

// One reload for a burst of events (a catch-up brings many messages at once).
function reloadConversationsSoon() {
  if (listQueued || !token) return;
  listQueued = true;
  setTimeout(() => { listQueued = false; if (token) loadConversations().catch(() => {}); }, 100);
}

function scrollDown() { $("messages").scrollTop = $("messages").scrollHeight; }

// Puts a stored message where its id belongs: before any later message, and before
// the bubbles of replies still streaming (which stay at the end).
function place(el, id) {
  const box = $("messages");
  for (const other of box.children) {
    if (other.dataset.id === undefined || +other.dataset.id > id) { box.insertBefore(el, other); return; }
  }
  box.appendChild(el);
}

function showMessage(m) {
  if (m.conversation_id !== current) return;
  lastId[current] = Math.max(lastId[current] || 0, m.id);
  if (m.reply_to) {
    const s = document.querySelector(`[data-stream="${m.reply_to}"]`);
    if (s) s.remove();
  }
  let el = document.querySelector(`#messages [data-id="${m.id}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "msg " + m.role;
    el.dataset.id = m.id;
    if (m.reply_to) el.dataset.replyTo = m.reply_to;
    place(el, m.id);
  }
  el.textContent = m.content;
  scrollDown();
}

function showToken(e) {
  if (e.conversation_id !== current) return;
  // the stored reply is already shown (tokens of a retried attempt, or late ones)
  if (document.querySelector(`#messages [data-reply-to="${e.reply_to}"]`)) return;
  let el = document.querySelector(`[data-stream="${e.reply_to}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "msg assistant streaming";
    el.dataset.stream = e.reply_to;
    $("messages").appendChild(el);
  }
  if (e.seq === 0) el.textContent = "";
  // (tokens missed while disconnected are not sent again: the stored reply replaces this)
  el.textContent += e.delta;
  scrollDown();
}

async function open(id) {
  current = id;
  showThread();
  $("messages").innerHTML = "";
  document.querySelectorAll("#conversations li").forEach((li) => li.classList.toggle("active", +li.dataset.id === id));
  const data = await api("GET", `/api/conversations/${id}/messages`);
  if (current !== id) return; // another conversation was opened meanwhile
  data.messages.forEach(showMessage);
  resume();
}

// Asks the server for the open conversation's messages after the last one shown
// (answered with `message` frames, then `resumed`).
function resume() {
  if (current === null || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ type: "resume", conversation_id: current, after: lastId[current] || 0 }));
}

function connect() {
  clearTimeout(reconnect);
  const proto = location.protocol === "https:" ? "wss" : "ws";
  // the token travels as a subprotocol, never in the URL (which proxies log)
  const s = new WebSocket(`${proto}://${location.host}/ws`, ["wingman", "wingman.token." + token]);
  socket = s;
  s.onopen = () => {
    retry = 500;
    status("connected");
    // catch up on what happened while there was no socket
    resume();
    reloadConversationsSoon();
  };
  s.onmessage = (ev) => {
    const e = JSON.parse(ev.data);
    if (e.type === "message") { showMessage(e.message); reloadConversationsSoon(); }
    else if (e.type === "token") showToken(e);
    else if (e.type === "resumed") { if (e.has_more && e.conversation_id === current) resume(); }
    else if (e.type === "reply_failed") status("reply failed: " + e.error);
    else if (e.type === "conversation_changed") {
      if (e.deleted && e.conversation_id === current) { current = null; $("messages").innerHTML = ""; showThread(); }
      reloadConversationsSoon();
    }
  };
  s.onclose = (ev) => {
    if (socket !== s) return;
    socket = null;
    if (ev.code === 4001) { endSession("Your session has ended: log in again."); return; }
    if (!token) return;
    status("reconnecting…");
    reconnect = setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  };
}

$("auth-form").onsubmit = (ev) => { ev.preventDefault(); auth(false); };
$("register").onclick = () => auth(true);
$("logout").onclick = logout;
$("new-conv").onclick = async () => {
  try {
    const data = await api("POST", "/api/conversations", { title: "Chat " + new Date().toLocaleTimeString() });
    await open(data.conversation.id);
    await loadConversations();
  } catch (e) { status(e.message); }
};
$("composer").onsubmit = async (ev) => {
  ev.preventDefault();
  const content = $("input").value;
  if (!content.trim()) return;
  try {
    if (current === null) {
      const c = await api("POST", "/api/conversations", { title: content.slice(0, 40) });
      current = c.conversation.id;
      showThread();
    }
    const data = await api("POST", `/api/conversations/${current}/messages`, { content });
    $("input").value = "";
    showMessage(data.message);
    reloadConversationsSoon();
  } catch (e) { status(e.message); }
};
$("input").onkeydown = (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); } };
showView(token ? "chat" : "auth");
if (token) enter().catch(() => endSession());
