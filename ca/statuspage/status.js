// The status page's live view: polls /status/api every second and re-renders every
// section from the document, with textContent only (nothing the proxies report is
// ever parsed as HTML). After each update, body's data-generation is the document's.
"use strict";

(function () {
  const period = 1000;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, String(v));
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  function zero(t) { return !t || t.startsWith("0001-01-01"); }
  function ts(t) { return zero(t) ? "—" : t.replace(/\.\d+/, ""); }
  function age(now, t) {
    if (zero(t)) return "—";
    const s = Math.max(0, Math.round((Date.parse(now) - Date.parse(t)) / 1000));
    return s < 120 ? s + "s ago" : Math.round(s / 60) + "m ago";
  }
  function list(a) { return (a || []).join(", "); }

  function tbody(section, rows) {
    const body = document.querySelector("#" + section + " tbody");
    body.replaceChildren(...rows);
  }

  function readiness(p) {
    const cut = p.truncated ? " · identities cut at the limit" : "";
    if (p.reported) return (p.ready ? "ready" : "not ready: " + (p.not_ready || "")) + cut;
    return p.invalid ? "status refused: " + p.invalid : "not reported";
  }

  function renderFleet(doc) {
    tbody("fleet", (doc.fleet || []).map((p) => el("tr", { "data-host": p.host, "data-ready": p.ready },
      el("td", {}, p.host),
      el("td", { title: ts(p.last_heartbeat) }, age(doc.now, p.last_heartbeat)),
      el("td", {}, p.version || "—"),
      el("td", {}, p.bundle_version || "—"),
      el("td", { class: "ready" }, readiness(p)),
      el("td", {}, list(p.addresses) + (p.tunnel_port ? " :" + p.tunnel_port : "")),
      el("td", {}, list(p.transports)))));
  }

  function renderIdentities(doc) {
    tbody("identities", (doc.identities || []).map((i) => el("tr",
      { "data-id": i.spiffe_id, "data-serial": i.serial || "", "data-state": i.state },
      el("td", {}, i.spiffe_id), el("td", {}, i.host), el("td", { class: "serial" }, i.serial || ""),
      el("td", {}, ts(i.not_after)), el("td", {}, ts(i.renew_at)),
      el("td", { class: "state" }, i.state + (i.error ? ": " + i.error : "")))));
  }

  // The time axis runs from the earliest segment start to now; an open segment ends
  // now, an instant (destroyed, compromised) is drawn as a thin mark (CSS min-width).
  function renderTimeline(doc) {
    const now = Date.parse(doc.now);
    let start = now;
    for (const row of doc.timeline || []) {
      for (const s of row.segments) start = Math.min(start, Date.parse(s.start));
    }
    const span = Math.max(1, now - start);
    const rows = (doc.timeline || []).map((row) => {
      const axis = el("div", { class: "axis" });
      for (const s of row.segments) {
        const from = Date.parse(s.start);
        const to = zero(s.end) ? now : Date.parse(s.end);
        const seg = el("span", {
          "data-version": s.version, "data-state": s.state, "data-start": ts(s.start), "data-end": ts(s.end),
          title: "key " + s.version + " " + s.state + (s.cause ? " (" + s.cause + ")" : "") + ": " +
            ts(s.start) + " → " + (zero(s.end) ? "now" : ts(s.end)),
        });
        seg.style.left = ((from - start) / span * 100) + "%";
        seg.style.width = (Math.max(0, to - from) / span * 100) + "%";
        axis.append(seg);
      }
      return el("div", { class: "tl", "data-id": row.spiffe_id }, el("span", { class: "label" }, row.spiffe_id), axis);
    });
    document.querySelector("#timeline .rows").replaceChildren(...rows);
  }

  function renderRevocations(doc) {
    const sec = document.getElementById("revocations");
    sec.dataset.listVersion = doc.revocation_list_version;
    sec.querySelector("h2 .meta").textContent = "deny-list version " + doc.revocation_list_version;
    tbody("revocations", (doc.revocations || []).map((r) => {
      const attrs = r.serial ? { "data-serial": r.serial, "data-spiffe-id": r.spiffe_id } : { "data-id": r.spiffe_id };
      const what = r.serial ? "serial " + r.serial + (r.spiffe_id ? " (" + r.spiffe_id + ")" : "") : r.spiffe_id;
      return el("tr", attrs, el("td", {}, what), el("td", {}, r.initiator || "—"), el("td", {}, ts(r.revoked_at)),
        el("td", {}, r.reason || ""), el("td", {}, ts(r.cutoff)), el("td", {}, r.version));
    }));
  }

  function renderRotation(doc) {
    const r = doc.rotation || {};
    const sec = document.getElementById("rotation");
    sec.dataset.phase = r.phase || "";
    sec.querySelector(".phase").textContent = r.phase || ("none" + (r.last_phase ? " (last: " + r.last_phase + ")" : ""));
    sec.querySelector(".kind").textContent = r.kind || "—";
    sec.querySelector(".started").textContent = ts(r.started);
    sec.querySelector(".waiting").textContent = (r.waiting || "—") + (r.error ? " · error: " + r.error : "");
    sec.querySelector(".missing").replaceChildren(...(r.missing || []).map((h) => el("li", { "data-host": h }, h)));
  }

  function renderWitness(doc) {
    tbody("witness", (doc.witness || []).map((w) => el("tr", { "data-origin": w.origin, "data-state": w.state },
      el("td", {}, w.origin), el("td", {}, w.size), el("td", {}, ts(w.last_seen)), el("td", { class: "state" }, w.state))));
  }

  function render(doc) {
    document.getElementById("dir-version").textContent = doc.directory_version;
    document.getElementById("now").textContent = ts(doc.now);
    renderFleet(doc);
    renderIdentities(doc);
    renderTimeline(doc);
    renderRevocations(doc);
    renderRotation(doc);
    renderWitness(doc);
    document.body.dataset.generation = doc.generation;
  }

  async function poll() {
    const live = document.getElementById("live");
    try {
      const resp = await fetch("/status/api", { cache: "no-store", credentials: "same-origin" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      render(await resp.json());
      live.textContent = "live";
      live.className = "";
    } catch (e) {
      live.textContent = "stale: " + e.message;
      live.className = "stale";
    }
    setTimeout(poll, period);
  }

  poll();
})();
