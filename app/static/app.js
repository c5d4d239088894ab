// Wingman chat page: register/login, conversations, streaming replies over /ws.
"use strict";
const $ = (id) => document.getElementById(id);
let token = localStorage.getItem("wingman.token");
let current = null;       // selected conversation id
let lastId = {};          // conversation id -> last message id seen (for resume)
let socket = null;
let retry = 500;

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = "Bearer " + token;
  const res = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (res.status === 401 && path !== "/api/login") { logout(); }
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
    await enter();
  } catch (e) { $("auth-error").textContent = e.message; }
}

function logout() {
  token = null; localStorage.removeItem("wingman.token");
  if (socket) socket.close();
  $("chat").hidden = true; $("auth").hidden = false;
}

async function enter() {
  const me = await api("GET", "/api/me");
  $("me").textContent = me.user.display_name;
  $("auth").hidden = true; $("chat").hidden = false;
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
  if (!current && data.conversations.length) await open(data.conversations[0].id);
}

function bubble(role, text, key) {
  let el = key ? document.querySelector(`[data-key="${key}"]`) : null;
  if (!el) {
    el = document.createElement("div");
    el.className = "msg " + role;
    if (key) el.dataset.key = key;
    $("messages").appendChild(el);
  }
  el.textContent = text;
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}

function showMessage(m) {
  if (m.conversation_id !== current) return;
  lastId[current] = Math.max(lastId[current] || 0, m.id);
  if (m.reply_to) {
    const s = document.querySelector(`[data-key="stream-${m.reply_to}"]`);
    if (s) s.remove();
  }
  bubble(m.role, m.content, "m" + m.id);
}

async function open(id) {
  current = id;
  $("messages").innerHTML = "";
  const data = await api("GET", `/api/conversations/${id}/messages`);
  data.messages.forEach(showMessage);
  document.querySelectorAll("#conversations li").forEach((li) => li.classList.toggle("active", +li.dataset.id === id));
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  // the token travels as a subprotocol, never in the URL (which proxies log)
  socket = new WebSocket(`${proto}://${location.host}/ws`, ["wingman", "wingman.token." + token]);
  socket.onopen = () => {
    retry = 500; $("status").textContent = "connected";
    if (current && lastId[current]) socket.send(JSON.stringify({ type: "resume", conversation_id: current, after: lastId[current] }));
  };
  socket.onmessage = (ev) => {
    const e = JSON.parse(ev.data);
    if (e.type === "message") { showMessage(e.message); loadConversations(); }
    else if (e.type === "token" && e.conversation_id === current) {
      const el = bubble("assistant streaming", "", "stream-" + e.reply_to);
      if (e.seq === 0) el.textContent = "";
      el.textContent += e.delta;
    } else if (e.type === "reply_failed") { $("status").textContent = "reply failed: " + e.error; }
    else if (e.type === "conversation_changed") { loadConversations(); }
  };
  socket.onclose = () => {
    if (!token) return;
    $("status").textContent = "reconnecting…";
    setTimeout(connect, retry); retry = Math.min(retry * 2, 10000);
  };
}

$("auth-form").onsubmit = (ev) => { ev.preventDefault(); auth(false); };
$("register").onclick = () => auth(true);
$("logout").onclick = logout;
$("new-conv").onclick = async () => {
  const data = await api("POST", "/api/conversations", { title: "Chat " + new Date().toLocaleTimeString() });
  current = null; await open(data.conversation.id); await loadConversations();
};
$("composer").onsubmit = async (ev) => {
  ev.preventDefault();
  const content = $("input").value;
  if (!content.trim()) return;
  try {
    if (!current) { const c = await api("POST", "/api/conversations", { title: content.slice(0, 40) }); current = c.conversation.id; }
    const data = await api("POST", `/api/conversations/${current}/messages`, { content });
    $("input").value = "";
    showMessage(data.message);
    loadConversations();
  } catch (e) { $("status").textContent = e.message; }
};
$("input").onkeydown = (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); } };
if (token) enter().catch(logout);
