// tunesmith web-ui: the form is built from /api/setup (SftArguments with the guide's defaults); the server turns it
// into a `tunesmith sft …` command, runs it, and reports /api/run; chat streams from /api/chat.
"use strict";
const $ = (id) => document.getElementById(id);
let setup = null;
const history = { base: [], tuned: [] };

// The launch's token comes once in the address web-ui printed (/?token=…); the tab keeps it and the address bar drops
// it. Every API call sends it: a page on another site cannot know it.
const TOKEN = (() => {
  const url = new URL(location.href);
  if (url.searchParams.has("token")) {
    sessionStorage.setItem("tunesmith-token", url.searchParams.get("token"));
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url);
  }
  return sessionStorage.getItem("tunesmith-token") || "";
})();

function headers(json) {
  return { "X-Tunesmith-Token": TOKEN, ...(json ? { "Content-Type": "application/json" } : {}) };
}

async function api(path, body, method) {
  const res = await fetch(path, {
    method: method || (body === undefined ? "GET" : "POST"),
    headers: headers(!(body instanceof Blob)),
    body: body === undefined ? undefined : body instanceof Blob ? body : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({ error: { message: `${res.status} ${res.statusText}` } }));
  if (!res.ok) throw new Error(data.error ? data.error.message : `${res.status} ${res.statusText}`);
  return data;
}

function quote(s) { // as shlex.quote
  return /^[\w@%+=:,./#-]+$/.test(s) ? s : "'" + s.replace(/'/g, `'"'"'`) + "'";
}

function short(path) { // run folder and checkpoint: output/v0-…/checkpoint-40 -> v0-…/checkpoint-40
  return path.split("/").slice(-2).join("/");
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  for (const c of children) node.append(c);
  return node;
}

// ---- setup: models, datasets, the form

function drawDatasets() {
  const box = $("datasets");
  const checked = new Set([...box.querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value));
  box.replaceChildren();
  for (const name of setup.builtin) {
    const id = `ds-${name}`;
    box.append(el("label", {}, el("input", { type: "checkbox", id, value: name, checked: checked.has(name) }),
      `${name} (built in)`, el("input", { type: "number", id: `${id}-n`, min: 1, placeholder: "#N", title: "sample N records" })));
  }
  for (const path of setup.uploaded) {
    box.append(el("label", { title: path }, el("input", { type: "checkbox", value: path, checked: checked.has(path) }),
      path.split("/").pop()));
  }
}

function drawForm() {
  for (const f of setup.fields) {
    let input;
    if (f.kind === "bool" || f.choices) {
      input = el("select", {});
      for (const c of f.kind === "bool" ? ["true", "false"] : f.choices) input.append(el("option", { value: c }, c));
      if (f.kind !== "bool" && f.value === "") input.prepend(el("option", { value: "" }, "(default)"));
    } else {
      input = el("input", { type: "text", placeholder: f.value === "" ? "(default)" : "" });
    }
    input.id = `f-${f.name}`;
    input.dataset.name = f.name;
    input.value = f.value;
    input.addEventListener("change", preview);
    const help = f.kind === "list" ? `${f.help} (several values: separate with spaces, quote one with spaces)` : f.help;
    $(f.common ? "common" : "advanced").append(el("label", { title: help }, f.name, input));
  }
}

function values() {
  const out = { model: $("model").value.trim() };
  for (const input of document.querySelectorAll("[data-name]")) out[input.dataset.name] = input.value;
  const specs = [];
  for (const c of $("datasets").querySelectorAll("input[type=checkbox]:checked")) {
    const n = $(`${c.id}-n`);
    specs.push(quote(c.value + (n && n.value ? `#${n.value}` : "")));
  }
  if ($("more-datasets").value.trim()) specs.push($("more-datasets").value.trim());
  out.dataset = specs.join(" ");
  return out;
}

const SAVED = "tunesmith-web-ui-form";

function saveForm() {
  const fields = {};
  for (const input of document.querySelectorAll("[data-name]")) fields[input.dataset.name] = input.value;
  const checked = [...$("datasets").querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value);
  const counts = {};
  for (const n of $("datasets").querySelectorAll("input[type=number]")) counts[n.id] = n.value;
  localStorage.setItem(SAVED, JSON.stringify({ model: $("model").value, fields, checked, counts, more: $("more-datasets").value }));
}

function restoreForm() {
  let saved;
  try { saved = JSON.parse(localStorage.getItem(SAVED)); } catch (e) { return; }
  if (!saved) return;
  $("model").value = saved.model || setup.model;
  for (const [name, value] of Object.entries(saved.fields || {})) if ($(`f-${name}`)) $(`f-${name}`).value = value;
  for (const c of $("datasets").querySelectorAll("input[type=checkbox]")) c.checked = (saved.checked || []).includes(c.value);
  for (const [id, value] of Object.entries(saved.counts || {})) if ($(id)) $(id).value = value;
  $("more-datasets").value = saved.more || "";
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

let previews = 0;
async function preview() {
  saveForm();
  const mine = ++previews;
  let command = "", error = "";
  try { command = (await api("/api/command", values())).command; } catch (e) { error = e.message; }
  if (mine !== previews) return; // an answer to an older form, overtaken by a newer one
  $("command").textContent = command;
  $("command").hidden = !command;
  showError(error);
}

async function inspect() {
  $("inspect-view").hidden = false;
  $("inspect-command").textContent = "";
  $("inspect-output").textContent = "reading and tokenizing…";
  try {
    const r = await api("/api/inspect", values());
    $("inspect-command").textContent = r.command;
    // the trained tokens come as [[ ]]: show them highlighted
    $("inspect-output").replaceChildren(...r.output.split(/(\[\[[\s\S]*?\]\])/).map((part) =>
      part.startsWith("[[") && part.endsWith("]]") ? el("mark", { title: "trained (loss)" }, part.slice(2, -2)) : part));
  } catch (e) {
    $("inspect-output").replaceChildren(el("span", { className: "error" }, e.message));
  }
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  try {
    const r = await api(`/api/upload/${encodeURIComponent(file.name)}`, file, "PUT");
    setup.uploaded = r.uploaded;
    drawDatasets();
    const box = [...$("datasets").querySelectorAll("input[type=checkbox]")].find((c) => c.value === r.dataset);
    if (box) box.checked = true;
    showError("");
    preview();
  } catch (e) {
    showError(e.message);
  }
  $("upload").value = "";
}

// ---- the run: start, stop, and its progress every second

async function start() {
  $("start").disabled = true;
  previews++; // what start says wins over a preview still on its way
  try {
    await api("/api/run", values());
    showError("");
  } catch (e) {
    showError(e.message);
  }
  refresh();
}

async function stop() {
  $("stop").disabled = true;
  try { await api("/api/run/stop", {}); } catch (e) { showError(e.message); }
  refresh();
}

let shownCheckpoints = "";
async function refresh() {
  let run;
  try { run = await api("/api/run"); } catch (e) { return; }
  const going = run.status === "running" || run.status === "stopping";
  $("status").textContent = run.status;
  $("status").className = `badge ${run.status}`;
  $("start").disabled = going;
  $("stop").disabled = run.status !== "running";
  $("run-command").hidden = !run.command;
  $("run-command").textContent = run.command || "";
  const pct = run.max_steps ? (100 * run.step) / run.max_steps : 0;
  $("progress-bar").style.width = `${pct}%`;
  const parts = [];
  if (run.max_steps) parts.push(`step ${run.step} of ${run.max_steps} (${pct.toFixed(0)}%)`);
  if (run.elapsed) parts.push(`elapsed ${run.elapsed}`);
  if (going && run.remaining) parts.push(`ETA ${run.remaining}`);
  if (run.points && run.points.length) parts.push(`loss ${run.points[run.points.length - 1][1].toFixed(4)}`);
  if (run.checkpoint) parts.push(`checkpoint ${short(run.checkpoint)}`);
  if (run.error) parts.push(run.error);
  if (going && !run.max_steps && run.log && run.log.length) parts.push(run.log[run.log.length - 1]);
  $("progress").textContent = parts.join(" · ") || (run.status === "idle" ? "no run yet" : "");
  $("log").textContent = (run.log || []).join("\n");
  drawChart(run.points || [], run.eval_points || []);
  $("curves").hidden = !run.curves;
  $("curves").textContent = run.curves || "";
  const key = (run.checkpoints || []).join() + run.status;
  if (key !== shownCheckpoints) {
    shownCheckpoints = key;
    loadCheckpoints(run.checkpoint);
  }
}

async function loadCheckpoints(prefer) {
  const { checkpoints } = await api("/api/checkpoints");
  const select = $("checkpoint");
  const before = select.value;
  select.replaceChildren(el("option", { value: "" }, checkpoints.length ? "(base only)" : "(no checkpoint yet)"),
    ...checkpoints.map((c) => el("option", { value: c, title: c }, short(c))));
  select.value = checkpoints.includes(prefer) ? prefer : checkpoints.includes(before) ? before : checkpoints[0] || "";
}

function drawChart(points, evals) {
  const canvas = $("chart");
  canvas.dataset.points = points.length;
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 52, R = 12, T = 14, B = 30;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  const all = points.concat(evals);
  if (!all.length) {
    ctx.fillText("the loss appears here once training logs its first step", L, H / 2);
    return;
  }
  const xmax = Math.max(...all.map((p) => p[0]), 2), xmin = Math.min(...all.map((p) => p[0]), 1);
  let ymin = Math.min(...all.map((p) => p[1])), ymax = Math.max(...all.map((p) => p[1]));
  if (ymax - ymin < 1e-6) { ymin -= 0.5; ymax += 0.5; }
  const x = (v) => L + ((v - xmin) / (xmax - xmin || 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - ymin) / (ymax - ymin)) * (H - T - B);
  ctx.strokeStyle = "#dde1ea";
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = ymin + ((ymax - ymin) * i) / 4;
    ctx.beginPath(); ctx.moveTo(L, y(v)); ctx.lineTo(W - R, y(v)); ctx.stroke();
    ctx.fillText(v.toFixed(3), L - 6, y(v) + 4);
  }
  ctx.textAlign = "center";
  ctx.fillText("optimizer step", (L + W - R) / 2, H - 4);
  for (const s of [xmin, Math.round((xmin + xmax) / 2), xmax]) ctx.fillText(s, x(s), H - B + 14);
  const line = (pts, color) => {
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
    for (const p of pts) { ctx.beginPath(); ctx.arc(x(p[0]), y(p[1]), 2.5, 0, 7); ctx.fill(); }
  };
  line(points, "#2f6fde");
  if (evals.length) line(evals, "#e08a1e");
  ctx.textAlign = "left";
  ctx.fillStyle = "#2f6fde";
  ctx.fillText("train loss", W - R - 120, T + 4);
  if (evals.length) { ctx.fillStyle = "#e08a1e"; ctx.fillText("eval loss", W - R - 55, T + 4); }
  ctx.lineWidth = 1;
}

// ---- chat: the same question to base and tuned, answers streamed side by side

async function ask(side, question, checkpoint) {
  const box = $(`${side}-answers`);
  box.append(el("div", { className: "q" }, `> ${question}`));
  const answer = el("div", { className: "a" }, "…");
  box.append(answer);
  history[side].push({ role: "user", content: question });
  let text = "";
  try {
    const res = await fetch("/api/chat", {
      method: "POST", headers: headers(true),
      body: JSON.stringify({ model: side, messages: history[side], checkpoint: checkpoint || null,
        base_model: $("model").value.trim() || null, stream: true }),
    });
    if (!res.ok) throw new Error((await res.json()).error.message);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(5));
        if (event.error) throw new Error(event.error.message);
        if (side === "base") $("base-title").textContent = `base: ${event.model}`;
        text += (event.choices[0] && event.choices[0].delta.content) || "";
        answer.textContent = text || "…";
        box.scrollTop = box.scrollHeight;
      }
    }
    history[side].push({ role: "assistant", content: text });
  } catch (e) {
    history[side].pop();
    answer.className = "a error";
    answer.textContent = e.message;
  }
}

async function send(event) {
  event.preventDefault();
  const question = $("chat-input").value.trim();
  if (!question) return;
  $("chat-input").value = "";
  $("send").disabled = true;
  const checkpoint = $("checkpoint").value;
  $("tuned-title").textContent = checkpoint ? `tuned: ${checkpoint.split("/").pop()}` : "tuned";
  const asks = [ask("base", question, checkpoint)];
  if (checkpoint) asks.push(ask("tuned", question, checkpoint));
  else $("tuned-answers").append(el("div", { className: "q" }, "(train, or pick a checkpoint, to chat with a tuned model)"));
  await Promise.all(asks);
  $("send").disabled = false;
}

function clearChat() {
  history.base = []; history.tuned = [];
  $("base-answers").replaceChildren(); $("tuned-answers").replaceChildren();
}

async function main() {
  try {
    setup = await api("/api/setup");
  } catch (e) {
    showError(e.message); // e.g. no token: open the address web-ui printed
    return;
  }
  for (const m of setup.models) $("models").append(el("option", { value: m }));
  $("model").value = setup.model;
  drawDatasets();
  drawForm();
  restoreForm();
  for (const id of ["model", "more-datasets"]) $(id).addEventListener("change", preview);
  $("datasets").addEventListener("input", saveForm);
  $("datasets").addEventListener("change", preview);
  $("upload").addEventListener("change", upload);
  $("inspect").addEventListener("click", inspect);
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  $("chat-form").addEventListener("submit", send);
  $("clear").addEventListener("click", clearChat);
  $("checkpoint").addEventListener("change", clearChat);
  preview();
  refresh();
  setInterval(refresh, 1000);
}

main();
