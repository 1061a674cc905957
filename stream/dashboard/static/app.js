// Emotion monitor dashboard: plain JS, no build step, no external resources.
// Data arrives over server-sent events (/events): a "snapshot" of the whole board, then "update"
// events carrying deltas (see stream/dashboard/state.py). Every string from the topics is put in
// the page with textContent / setAttribute, never as HTML.
"use strict";

(function () {
  const EMOTIONS = ["anger", "disgust", "fear", "sadness", "surprise", "joy", "neutral"];
  const EMORY = ["mad", "scared", "sad", "joyful", "peaceful", "powerful"];
  const KNOWN = new Set(EMOTIONS.concat(EMORY));
  const LEVEL_TEXT = { critical: "critical", warning: "warning", elevated: "elevated", low: "low" };

  const board = { convs: new Map(), alerts: [], limits: { max_alerts: 200, max_alerts_per_conversation: 50 }, consumer: {} };
  let selected = decodeHash();
  let dirty = { list: true, detail: true, alerts: true };
  let renderTimer = null;
  let followTimeline = true;   // keep the timeline scrolled to the newest utterance

  const $ = (id) => document.getElementById(id);

  // ---- helpers -----------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function emoKey(emotion) {
    return String(emotion || "").toLowerCase().replace(/[^a-z]/g, "");
  }
  function paintEmotion(node, emotion) {
    const key = emoKey(emotion);
    if (KNOWN.has(key)) {
      node.classList.add("emo-" + key);
    } else {  // a label we have no colour for: a stable colour from its name
      let h = 0;
      for (const ch of key) h = (h * 31 + ch.charCodeAt(0)) % 360;
      node.style.backgroundColor = "hsl(" + h + ", 35%, 55%)";
      node.classList.add("emo-other");
    }
  }
  // text that may break after "_", "-", "." or "/" (rule names are long snake_case identifiers)
  function breakable(text) {
    const frag = document.createDocumentFragment();
    for (const part of String(text ?? "").split(/(?<=[_\-./])/)) {
      frag.append(document.createTextNode(part), document.createElement("wbr"));
    }
    return frag;
  }
  function fmtScore(s) { return typeof s === "number" ? s.toFixed(2) : "?"; }
  function fmtTime(ts) {
    if (typeof ts !== "number") return "";
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }
  function ago(ts) {
    if (typeof ts !== "number") return "";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return Math.round(s) + "s ago";
    if (s < 3600) return Math.round(s / 60) + "m ago";
    return Math.round(s / 3600) + "h ago";
  }
  function who(role, speaker) {
    if (role && speaker && role !== speaker) return role + " (" + speaker + ")";
    return role || speaker || "?";
  }
  function seqRange(a) {
    if (a.seq_from === null || a.seq_from === undefined) return "";
    if (a.seq_to === null || a.seq_to === undefined || a.seq_to === a.seq_from) return "seq " + a.seq_from;
    return "seq " + a.seq_from + "–" + a.seq_to;
  }
  function decodeHash() {
    const m = /^#c=(.*)$/.exec(location.hash);
    if (!m) return null;
    try { return decodeURIComponent(m[1]); } catch (e) { return null; }
  }
  function riskBadge(node, conv) {
    const level = conv.risk_level || "low";
    node.className = "risk risk-" + level;
    node.textContent = LEVEL_TEXT[level] || level;
    const sev = conv.open_alerts_by_severity || {};
    node.title = "risk " + (conv.risk || 0) + " · open alerts: " + (sev.critical || 0) + " critical, " +
      (sev.warning || 0) + " warning, " + (sev.info || 0) + " info · negative share of the last finals: " +
      Math.round((conv.negative_share || 0) * 100) + "%";
  }

  // ---- model ---------------------------------------------------------------------------------
  function blank(cid) {
    return { conversation_id: cid, state: "active", risk: 0, risk_level: "low", negative_share: 0, open_alert_count: 0,
             open_alerts: [], open_alerts_by_severity: {}, cells: new Map(), alerts: [], summary: null, last_seen: Date.now() / 1000 };
  }
  function ensure(cid) {
    let c = board.convs.get(cid);
    if (!c) { c = blank(cid); board.convs.set(cid, c); }
    return c;
  }
  function fromFull(full) {
    const c = blank(full.conversation_id);
    Object.assign(c, full);
    c.cells = new Map();
    for (const cell of full.cells || []) c.cells.set(cell.seq, cell);
    c.alerts = (full.alerts || []).slice();
    return c;
  }
  function applySnapshot(snap) {
    board.convs.clear();
    board.limits = snap.limits || board.limits;
    for (const c of (snap.conversations || []).concat(snap.ended || [])) board.convs.set(c.conversation_id, fromFull(c));
    board.alerts = (snap.alerts || []).slice();
    dirty = { list: true, detail: true, alerts: true };
  }
  function applyDelta(d) {
    switch (d.op) {
      case "cell": {
        const c = ensure(d.conversation_id);
        c.cells.set(d.cell.seq, d.cell);
        if (d.conversation_id === selected) dirty.detail = true;
        break;
      }
      case "trim": {
        const c = board.convs.get(d.conversation_id);
        if (c) for (const seq of Array.from(c.cells.keys())) if (seq < d.below_seq) c.cells.delete(seq);
        if (d.conversation_id === selected) dirty.detail = true;
        break;
      }
      case "conv": {
        const c = ensure(d.conv.conversation_id);
        Object.assign(c, d.conv);
        dirty.list = true;
        if (c.conversation_id === selected) dirty.detail = true;
        break;
      }
      case "alert": {
        board.alerts.unshift(d.alert);
        if (board.alerts.length > board.limits.max_alerts) board.alerts.length = board.limits.max_alerts;
        const c = ensure(d.alert.conversation_id);
        c.alerts.unshift(d.alert);
        if (c.alerts.length > board.limits.max_alerts_per_conversation) c.alerts.length = board.limits.max_alerts_per_conversation;
        dirty.alerts = true;
        dirty.list = true;
        if (c.conversation_id === selected) dirty.detail = true;
        break;
      }
      case "ended": {
        board.convs.set(d.conversation.conversation_id, fromFull(d.conversation));
        dirty.list = true;
        if (d.conversation.conversation_id === selected) dirty.detail = true;
        break;
      }
      case "remove": {
        board.convs.delete(d.conversation_id);
        dirty.list = true;
        if (d.conversation_id === selected) dirty.detail = true;
        break;
      }
      default:
        break;  // "status" and ops this page does not know: nothing to redraw
    }
  }

  // ---- rendering -----------------------------------------------------------------------------
  function schedule() {
    if (renderTimer === null) renderTimer = setTimeout(render, 40);
  }
  function render() {
    renderTimer = null;
    if (dirty.list) renderLists();
    if (dirty.detail) renderDetail();
    if (dirty.alerts) renderAlerts();
    renderCounts();
    dirty = { list: false, detail: false, alerts: false };
  }
  function select(cid) {
    selected = cid;
    followTimeline = true;
    history.replaceState(null, "", "#c=" + encodeURIComponent(cid));
    dirty = { list: true, detail: true, alerts: true };
    render();
  }

  function ranked() {
    const active = [], ended = [];
    for (const c of board.convs.values()) (c.state === "ended" ? ended : active).push(c);
    active.sort((a, b) => (b.risk - a.risk) || (b.last_seen - a.last_seen));
    ended.sort((a, b) => (b.ended_at || 0) - (a.ended_at || 0));
    return { active, ended };
  }

  function convItem(c) {
    const li = el("li", "conv-item");
    li.setAttribute("data-testid", "conv-" + c.conversation_id);
    li.setAttribute("data-risk-level", c.risk_level || "low");
    li.tabIndex = 0;
    li.setAttribute("role", "button");
    if (c.conversation_id === selected) li.classList.add("selected");
    const row1 = el("div", "row1");
    const badge = el("span");
    riskBadge(badge, c);
    const cidSpan = el("span", "cid", c.conversation_id);
    cidSpan.title = c.conversation_id;
    row1.append(badge, cidSpan);
    if (c.open_alert_count) {
      const n = el("span", "alert-count", "⚠ " + c.open_alert_count);
      n.title = c.open_alert_count + " open alert(s)";
      const sev = c.open_alerts_by_severity || {};
      n.classList.add(sev.critical ? "sev-critical" : sev.warning ? "sev-warning" : "sev-info");
      row1.append(n);
    }
    const row2 = el("div", "row2");
    if (c.last_emotion) {
      const chip = el("span", "emo-chip", c.last_emotion);
      paintEmotion(chip, c.last_emotion);
      if (c.last_status !== "final") chip.classList.add("status-" + (c.last_status || "provisional"));
      chip.title = "last utterance (seq " + c.last_seq + "): " + c.last_emotion + " (" + c.last_status + ") by " + who(c.last_role, c.last_speaker);
      row2.append(chip);
    }
    row2.append(el("span", "muted", (c.utterances || 0) + " utt"));
    if (c.negative_share) row2.append(el("span", "neg", Math.round(c.negative_share * 100) + "% neg"));
    row2.append(el("span", "muted age", c.state === "ended" ? "ended " + ago(c.ended_at) : ago(c.last_seen)));
    li.append(row1, row2);
    li.addEventListener("click", () => select(c.conversation_id));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(c.conversation_id); } });
    return li;
  }

  function renderLists() {
    const { active, ended } = ranked();
    $("conv-list").replaceChildren(...active.map(convItem));
    $("ended-list").replaceChildren(...ended.map(convItem));
    $("conv-empty").hidden = active.length > 0;
    $("ended-empty").hidden = ended.length > 0;
    $("active-count").textContent = active.length ? "(" + active.length + ")" : "";
    $("ended-count").textContent = ended.length ? "(" + ended.length + ")" : "";
    if (selected === null && active.length) select(active[0].conversation_id);  // riskiest by default
  }

  function renderCounts() {
    const a = board.alerts.filter((x) => x.kind === "raised").length;
    $("counts").textContent = board.convs.size + (board.convs.size === 1 ? " conversation" : " conversations") +
      " · " + a + (a === 1 ? " alert raised" : " alerts raised") + " in the feed";
    const st = board.consumer || {};
    const cons = $("consumer");
    cons.textContent = st.state ? "kafka: " + st.state : "";
    cons.className = "consumer consumer-" + (st.state || "unknown").replace(/[^a-z]/g, "");
    cons.title = st.error ? "consumer error: " + st.error : "records read: " + (st.records || 0);
  }

  function laneKey(cell) { return (cell.role || "") + "\u0000" + (cell.speaker || ""); }
  function laneOrder(role) {
    const r = String(role || "").toLowerCase();
    return r === "customer" ? 0 : r === "agent" ? 1 : 2;
  }

  function renderTimeline(c) {
    const wrap = $("timeline-wrap");
    const atEnd = wrap.scrollLeft + wrap.clientWidth >= wrap.scrollWidth - 4;
    const tl = $("timeline");
    const cells = Array.from(c.cells.values()).sort((a, b) => a.seq - b.seq);
    if (!cells.length) {
      tl.replaceChildren(el("div", "empty", "No utterance yet."));
      tl.style.gridTemplateColumns = "";
      return;
    }
    const lanes = new Map();
    for (const cell of cells) {
      const k = laneKey(cell);
      if (!lanes.has(k)) lanes.set(k, { role: cell.role, speaker: cell.speaker, first: cell.seq, cells: [] });
      lanes.get(k).cells.push(cell);
    }
    const order = Array.from(lanes.values()).sort((a, b) => (laneOrder(a.role) - laneOrder(b.role)) || (a.first - b.first));
    const minSeq = cells[0].seq, maxSeq = cells[cells.length - 1].seq;
    const cols = maxSeq - minSeq + 1;
    tl.style.gridTemplateColumns = "var(--lane-w) repeat(" + cols + ", var(--cell-w))";
    const nodes = [];
    const negative = new Set(c.negative_emotions || []);  // the emotions the alert rules look for
    // axis
    const corner = el("div", "lane-label axis-corner", "seq");
    corner.style.gridRow = "1"; corner.style.gridColumn = "1";
    nodes.push(corner);
    for (let s = minSeq; s <= maxSeq; s++) {
      if (s === minSeq || s === maxSeq || s % 5 === 0) {
        const t = el("div", "axis", s);
        t.style.gridRow = "1"; t.style.gridColumn = String(s - minSeq + 2);
        nodes.push(t);
      }
    }
    order.forEach((lane, i) => {
      const row = String(i + 2);
      const label = el("div", "lane-label");
      label.style.gridRow = row; label.style.gridColumn = "1";
      label.append(el("span", "lane-role", lane.role || lane.speaker || "?"));
      if (lane.role && lane.speaker) label.append(el("span", "lane-speaker muted", lane.speaker));
      label.title = who(lane.role, lane.speaker);
      nodes.push(label);
      for (const cell of lane.cells) {
        const d = el("div", "cell status-" + cell.status, emoKey(cell.emotion).slice(0, 3));
        paintEmotion(d, cell.emotion);
        if (negative.has(emoKey(cell.emotion))) d.classList.add("negative");
        d.style.gridRow = row; d.style.gridColumn = String(cell.seq - minSeq + 2);
        d.setAttribute("data-testid", "cell-" + c.conversation_id + "-" + cell.seq);
        d.setAttribute("data-status", cell.status);
        d.setAttribute("data-emotion", cell.emotion);
        d.setAttribute("data-seq", String(cell.seq));
        d.tabIndex = 0;
        const text = "seq " + cell.seq + " · " + who(cell.role, cell.speaker) + " · " + cell.emotion + " " +
          fmtScore(cell.score) + " · " + (cell.status === "final" ? "final" : cell.status + " (provisional, may change)");
        d.title = text;
        const show = () => { $("cell-info").textContent = text + (cell.ts ? " · " + fmtTime(cell.ts) : ""); };
        d.addEventListener("mouseenter", show);
        d.addEventListener("focus", show);
        nodes.push(d);
      }
    });
    tl.replaceChildren(...nodes);
    if (followTimeline || atEnd) wrap.scrollLeft = wrap.scrollWidth;
    followTimeline = false;
  }

  function openAlertChip(a) {
    const chip = el("span", "open-chip sev-" + a.severity);
    chip.append(el("b", null, a.severity), document.createTextNode(" " + a.rule + " · " + seqRange(a) + " · "),
                el("span", "reason", a.reason));
    chip.title = a.reason;
    return chip;
  }

  function distributionBlock(dist) {
    const box = el("div", "dist");
    for (const [whoName, counts] of Object.entries(dist || {})) {
      const total = Object.values(counts).reduce((s, n) => s + n, 0) || 1;
      const row = el("div", "dist-row");
      row.append(el("span", "dist-who", whoName));
      const bar = el("span", "dist-bar");
      const parts = Object.entries(counts).sort((a, b) => b[1] - a[1]);
      for (const [emo, n] of parts) {
        const seg = el("span", "dist-seg");
        paintEmotion(seg, emo);
        seg.style.width = (100 * n / total).toFixed(1) + "%";
        seg.title = emo + ": " + n;
        bar.append(seg);
      }
      row.append(bar);
      row.append(el("span", "dist-text muted", parts.map(([e, n]) => e + " " + n).join(" · ")));
      box.append(row);
    }
    return box;
  }

  function renderSummary(c) {
    const slot = $("summary-slot");
    const s = c.summary;
    if (!s) { slot.replaceChildren(); return; }
    const card = el("section", "summary-card");
    card.setAttribute("data-testid", "summary-" + c.conversation_id);
    const head = el("div", "summary-head");
    head.append(el("h3", null, "Summary"),
      el("span", "muted", "ended by " + (s.ended_by || "?") + " · " + (s.utterances ?? "?") + " utterances" +
        (typeof s.risk === "number" ? " · risk at end " + s.risk.toFixed(2) : "") +
        ((s.open_alerts || []).length ? " · " + s.open_alerts.length + " alert(s) still open" : "") +
        (s.model && s.model.name ? " · model " + s.model.name + " " + (s.model.version || "") : "") +
        (s.ts_emitted ? " · " + fmtTime(s.ts_emitted) : "")));
    card.append(head);
    const grid = el("div", "summary-grid");
    const d = el("div", "summary-col");
    d.append(el("h4", null, "Emotions per role"), distributionBlock(s.distribution));
    const p = el("div", "summary-col");
    p.append(el("h4", null, "Peaks"));
    const pl = el("ol", "peaks");
    for (const pk of s.peaks || []) {
      const li = el("li");
      const chip = el("span", "emo-chip", pk.emotion);
      paintEmotion(chip, pk.emotion);
      li.append(chip, document.createTextNode(" " + fmtScore(pk.score) + " · seq " + pk.seq + " · " + who(pk.role, pk.speaker)));
      pl.append(li);
    }
    if (!pl.children.length) pl.append(el("li", "muted", "none"));
    p.append(pl);
    const a = el("div", "summary-col");
    a.append(el("h4", null, "Alerts"));
    const al = el("ul", "summary-alerts");
    const stillOpen = new Set(s.open_alerts || []);
    if (s.alerts_truncated) al.append(el("li", "muted", "… earlier alerts not shown"));
    for (const x of s.alerts || []) {
      const li = el("li", "sev-" + (x.severity || "info") + " kind-" + (x.kind || "raised"));
      li.append(el("b", null, x.kind === "recovered" ? "recovered" : (x.severity || "?")),
                document.createTextNode(" " + (x.rule || "?") + " " + (x.kind || "") + " · " + seqRange(x)));
      if (stillOpen.has(x.alert_id)) li.append(el("span", "still-open", "still open"));
      al.append(li);
    }
    if (!al.children.length) al.append(el("li", "muted", "none"));
    a.append(al);
    grid.append(d, p, a);
    card.append(grid);
    slot.replaceChildren(card);
  }

  function renderDetail() {
    const c = selected === null ? null : board.convs.get(selected);
    $("detail-empty").hidden = !!c;
    $("detail-body").hidden = !c;
    if (!c) {
      if (selected !== null) $("detail-empty").textContent = "Conversation " + selected + " is no longer on the board.";
      return;
    }
    $("detail-title").textContent = c.conversation_id;
    riskBadge($("detail-risk"), c);
    const st = $("detail-state");
    st.textContent = c.state === "ended" ? "ended (" + (c.ended_by || "?") + ")" : "active";
    st.className = "state state-" + c.state;
    const meta = [(c.utterances || 0) + " utterances", (c.finals || 0) + " final",
      Math.round((c.negative_share || 0) * 100) + "% negative (last finals the rules watch)",
      "last event " + ago(c.last_seen)];
    if (c.model && c.model.name) meta.push("model " + c.model.name + " " + (c.model.version || ""));
    $("detail-meta").textContent = meta.join(" · ");
    $("detail-open").replaceChildren(...(c.open_alerts || []).map(openAlertChip));
    renderTimeline(c);
    renderSummary(c);
    renderConvAlerts(c);
  }

  function renderConvAlerts(c) {
    const box = $("conv-alerts");
    box.hidden = !(c.alerts && c.alerts.length);
    const items = (c.alerts || []).map((a) => {
      const li = el("li", "sev-" + a.severity + " kind-" + a.kind);
      li.append(el("b", null, a.kind === "recovered" ? "recovered" : a.severity),
        document.createTextNode(" " + fmtTime(a.ts_emitted) + " · " + a.rule + " · " + seqRange(a) + " · " + a.reason));
      return li;
    });
    $("conv-alerts-list").replaceChildren(...items);
  }

  function renderAlerts() {
    const items = board.alerts.map((a) => {
      const li = el("li", "alert-item sev-" + a.severity + " kind-" + a.kind);
      li.setAttribute("data-testid", "alert-" + a.alert_id);
      li.setAttribute("data-severity", a.severity);
      li.tabIndex = 0;
      li.setAttribute("role", "button");
      if (a.conversation_id === selected) li.classList.add("selected");
      const r1 = el("div", "row1");
      r1.append(el("span", "sev-tag", a.kind === "recovered" ? "recovered" : a.severity),
        el("span", "rule"), el("span", "muted time", fmtTime(a.ts_emitted)));
      r1.querySelector(".rule").append(breakable(a.rule));
      const r2 = el("div", "reason", a.reason);
      const r3 = el("div", "row3 muted", a.conversation_id + " · " + seqRange(a) + (a.role || a.speaker ? " · " + who(a.role, a.speaker) : ""));
      li.append(r1, r2, r3);
      li.title = "show conversation " + a.conversation_id;
      li.addEventListener("click", () => select(a.conversation_id));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(a.conversation_id); } });
      return li;
    });
    $("alert-feed").replaceChildren(...items);
    $("alert-empty").hidden = items.length > 0;
    $("alert-count").textContent = items.length ? "(" + items.length + ")" : "";
  }

  function renderLegend() {
    const lg = $("legend");
    for (const e of EMOTIONS) {
      const s = el("span", "legend-item");
      const sw = el("span", "swatch");
      paintEmotion(sw, e);
      s.append(sw, document.createTextNode(e));
      lg.append(s);
    }
  }

  // ---- connection ----------------------------------------------------------------------------
  function setConn(state, text) {
    const c = $("conn");
    c.className = "conn conn-" + state;
    c.textContent = text;
  }
  function connect() {
    const es = new EventSource("/events");
    es.addEventListener("open", () => setConn("live", "live"));
    es.addEventListener("error", () => setConn("down", "reconnecting…"));  // EventSource retries by itself
    es.addEventListener("snapshot", (ev) => {
      const msg = JSON.parse(ev.data);
      board.consumer = msg.consumer || {};
      applySnapshot(msg.board);
      setConn("live", "live");
      schedule();
    });
    es.addEventListener("update", (ev) => {
      const msg = JSON.parse(ev.data);
      board.consumer = msg.consumer || board.consumer;
      for (const d of msg.deltas || []) applyDelta(d);
      schedule();
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    renderLegend();
    $("timeline-wrap").addEventListener("scroll", () => {
      const w = $("timeline-wrap");
      followTimeline = w.scrollLeft + w.clientWidth >= w.scrollWidth - 4;
    });
    window.addEventListener("hashchange", () => { const h = decodeHash(); if (h !== null && h !== selected) select(h); });
    setInterval(() => { dirty.list = true; schedule(); }, 5000);  // refresh the "…s ago" labels
    render();
    connect();
  });
})();
