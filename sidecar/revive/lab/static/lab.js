// Revive recovery lab / console. Plain JS, no framework, no network beyond this origin.
"use strict";

(function () {
  const TOKEN_KEY = "revive-admin-token";
  const DEFAULT_CONNECTION = "conn_microsoft_ops";
  const $ = (id) => document.getElementById(id);
  let snapshot = null;
  let selected = null;          // case id shown in the record
  let selectedVersion = -1;
  let streamAbort = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY); }
  function headers(extra) {
    const h = Object.assign({ "Accept": "application/json" }, extra || {});
    const t = token();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  }
  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || "GET", headers: headers(opts.headers), cache: "no-store" };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers["Content-Type"] = "application/json";
      init.headers["X-Revive-Lab"] = "1";
    }
    const resp = await fetch(path, init);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    return { status: resp.status, data: data };
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.append(c);
    return node;
  }
  function fmtTime(epochSeconds) {
    if (epochSeconds == null) return "";
    const d = new Date(epochSeconds * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }
  function setText(id, value) { $(id).textContent = value == null || value === "" ? "—" : String(value); }
  function badge(text) { return el("span", { class: "badge " + String(text).replace(/ /g, "_"), text: text }); }
  function say(msg) { $("action-result").textContent = msg; }

  // -- rendering -------------------------------------------------------------------------

  function render(snap) {
    snapshot = snap;
    $("mode").textContent = snap.interactive ? "recovery lab" : "recovery console (read-only)";
    $("controls").hidden = !snap.interactive;
    $("mails-panel").hidden = !snap.interactive;
    $("worker-panel").hidden = !snap.interactive;
    renderCases(snap.cases);
    renderRuns(snap.runs, snap.demo);
    if (snap.interactive) {
      renderFaults(snap.faults);
      renderMails(snap.mails || []);
      renderDemo(snap.demo);
    }
    const cases = snap.cases.slice().sort((a, b) => b.created_at - a.created_at);
    if (!selected && cases.length) select(cases[0].case_id);
    const current = snap.cases.find((c) => c.case_id === selected);
    if (current && current.version !== selectedVersion) loadCase(selected);
    else if (selected && current) refreshLedger();
  }

  function renderCases(cases) {
    const list = $("cases");
    list.replaceChildren();
    if (!cases.length) { list.append(el("li", { class: "empty", text: "No recovery cases." })); return; }
    for (const c of cases.slice().sort((a, b) => b.created_at - a.created_at)) {
      const label = c.case_id + " · " + c.state + (c.provider_code ? " · " + c.provider_code : "");
      const b = el("button", { type: "button", class: "case", "aria-label": "Case " + label,
                               "aria-current": String(c.case_id === selected) }, [
        el("code", { text: c.case_id }), " ", badge(c.state),
        el("div", { class: "hint", text: (c.workflow || c.run_id) + (c.provider_code ? " — " + c.provider_code : "") }),
      ]);
      b.addEventListener("click", () => select(c.case_id));
      list.append(el("li", {}, [b]));
    }
  }

  function renderRuns(runs, demo) {
    const list = $("runs");
    list.replaceChildren();
    if (!runs.length && !demo) { list.append(el("li", { class: "empty", text: "No runs yet." })); return; }
    const shown = new Set();
    for (const r of runs) {
      shown.add(r.run_id);
      const extra = demo && demo.run_id === r.run_id ? " · worker " + demo.status : "";
      const ledger = el("ul", { class: "ledger", "aria-label": "Ledger of " + r.run_id });
      for (const a of r.actions) {
        ledger.append(el("li", { "data-key": a.idempotency_key }, [
          a.action_key + " ", badge(a.ledger), a.reconciled ? " reconciled" : "",
        ]));
      }
      list.append(el("li", {}, [el("code", { text: r.run_id }), " " + (r.workflow || "") + " · epoch " + r.epoch + extra, ledger]));
    }
    if (demo && !shown.has(demo.run_id)) {
      list.append(el("li", {}, [el("code", { text: demo.run_id }), " " + demo.workflow + " · worker " + demo.status]));
    }
  }

  let faultsBuilt = false;
  function renderFaults(faults) {
    if (faultsBuilt || !faults) return;
    faultsBuilt = true;
    const box = $("faults");
    for (const f of faults) {
      const b = el("button", { type: "button", text: f.label, "data-fault": f.fault });
      b.addEventListener("click", () => act("api/faults", { fault: f.fault }, f.label));
      box.append(b);
    }
  }

  function renderMails(mails) {
    $("mail-count").textContent = String(mails.length);
    const list = $("mails");
    list.replaceChildren();
    if (!mails.length) { list.append(el("li", { class: "empty", text: "No mail sent." })); return; }
    for (const m of mails) {
      const to = Array.isArray(m.to) ? m.to.join(", ") : (m.to || "");
      list.append(el("li", { class: "mail" }, [
        el("strong", { text: m.subject || "(no subject)" }), to ? " → " + to : "",
        el("div", { class: "hint mono", text: m.idempotency_key ? "key " + m.idempotency_key : "" }),
      ]));
    }
  }

  function renderDemo(demo) {
    if (!demo) return;
    $("demo-line").textContent = "Run " + demo.run_id + " “" + demo.workflow + "”: worker " +
      demo.status + (demo.running ? " (running)" : "") + ", epoch " + demo.epoch + ", checkpoint " + demo.checkpoint +
      (demo.case_id ? ", parked on " + demo.case_id : "");
    const log = $("worker-log");
    log.replaceChildren(...demo.events.map((e) => el("li", { text: e })));
    log.scrollTop = log.scrollHeight;
  }

  function select(caseId) {
    selected = caseId;
    selectedVersion = -1;
    for (const b of document.querySelectorAll("#cases button.case")) {
      b.setAttribute("aria-current", String(b.getAttribute("aria-label").startsWith("Case " + caseId + " ")));
    }
    loadCase(caseId);
  }

  async function loadCase(caseId) {
    const { status, data } = await api("api/cases/" + encodeURIComponent(caseId));
    if (status !== 200 || caseId !== selected) return;
    selectedVersion = data.version;
    renderRecord(data);
  }

  function refreshLedger() {
    if (!snapshot || !selected) return;
    const c = snapshot.cases.find((x) => x.case_id === selected);
    const run = c && snapshot.runs.find((r) => r.run_id === c.run_id);
    if (run) renderLedger(run.actions, c.idempotency_key);
  }

  function renderRecord(d) {
    $("record-empty").hidden = true;
    $("record-body").hidden = false;
    setText("r-case", d.case_id);
    const st = $("r-state");
    st.textContent = d.state;
    st.className = "badge " + d.state;
    setText("r-broke", d.what_broke);
    setText("r-run", d.run_id);
    setText("r-workflow", d.workflow);
    setText("r-checkpoint", d.checkpoint_id);
    setText("r-epoch", d.epoch);
    setText("r-connection", d.connection_id);
    setText("r-generation", d.generation);
    setText("r-failure", "Grant rejected: " + (d.failure_class || "").replace(/_/g, " "));
    setText("r-code", d.provider_code);
    setText("r-message", d.provider_message);
    setText("r-action", d.action_key);
    setText("r-key", d.idempotency_key);
    setText("r-ledger", d.failed_action ? d.failed_action.ledger : "no ledger row");
    setText("r-outcome", d.outcome);
    const tl = $("timeline");
    tl.replaceChildren();
    for (const t of d.transitions) {
      tl.append(el("tr", { "data-seq": String(t.seq) }, [
        el("td", { text: fmtTime(t.at) }),
        el("td", {}, [t.from_state ? t.from_state + " → " : "", badge(t.to_state)]),
        el("td", { text: t.actor }),
        el("td", { class: "evidence", text: JSON.stringify(t.evidence) }),
      ]));
    }
    renderLedger(d.actions, d.idempotency_key);
  }

  function renderLedger(actions, failedKey) {
    const body = $("ledger");
    body.replaceChildren();
    for (const a of actions) {
      const ev = a.evidence ? JSON.stringify(a.evidence) : "";
      body.append(el("tr", { "data-key": a.idempotency_key, class: a.idempotency_key === failedKey ? "failed" : "" }, [
        el("td", { text: a.action_key }),
        el("td", { class: "mono", text: a.idempotency_key }),
        el("td", {}, [badge(a.ledger), a.reconciled ? " reconciled" : ""]),
        el("td", { text: String(a.attempts) }),
        el("td", { text: a.status == null ? "—" : String(a.status) }),
        el("td", { class: "evidence", text: ev }),
      ]));
    }
  }

  // -- actions ---------------------------------------------------------------------------

  async function act(path, body, label) {
    say(label + "…");
    const { status, data } = await api(path, { method: "POST", body: body });
    say(status < 300 ? label + ": done" : label + ": " + (data && data.detail ? data.detail : "HTTP " + status));
    return status;
  }

  function wireControls() {
    $("run-briefing").addEventListener("click", () => act("api/run", {}, "Run briefing"));
    $("kill-worker").addEventListener("click", () => act("api/kill", {}, "Kill the worker"));
    $("resume").addEventListener("click", () => act("api/resume", selected ? { case_id: selected } : {}, "Resume"));
    $("reconnect").addEventListener("click", () => {
      const c = snapshot && snapshot.cases.find((x) => x.case_id === selected);
      const conn = c ? c.connection_id : DEFAULT_CONNECTION;
      // The real OAuth consent flow: the sidecar 302s to the provider's consent page.
      window.open("/v1/connections/" + encodeURIComponent(conn) + "/connect", "_blank");
      say("Reconnect: accept on the provider's consent page, then come back here.");
    });
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("auth-token").value.trim());
      $("auth").hidden = true;
      boot();
    });
  }

  // -- live updates (SSE over fetch, so the read-only console can send its token) ---------

  async function stream() {
    if (streamAbort) streamAbort.abort();
    const ctl = new AbortController();
    streamAbort = ctl;
    try {
      const resp = await fetch("events", { headers: headers({ "Accept": "text/event-stream" }), signal: ctl.signal, cache: "no-store" });
      if (resp.status === 401) { needToken(); return; }
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      $("live").textContent = "live";
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          handle(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    $("live").textContent = "reconnecting…";
    setTimeout(stream, 1000);
  }

  function handle(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (event === "snapshot") render(payload);
    else if (event === "transition" && payload.case_id === selected) loadCase(selected);
  }

  function needToken() {
    $("auth").hidden = false;
    $("main").hidden = true;
    $("live").textContent = "admin token needed";
  }

  async function boot() {
    const { status, data } = await api("api/state");
    if (status === 401) { needToken(); return; }
    $("main").hidden = false;
    if (status === 200) render(data);
    stream();
  }

  wireControls();
  boot();
})();
