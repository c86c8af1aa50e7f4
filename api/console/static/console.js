// Letterpress console: live progress over Server-Sent Events and the gallery's infinite scroll.
// Every page works without this script (a reload shows the same state); it only saves the reloads.
"use strict";

function follow(section, onProgress) {
  // The page's event stream: progress updates in place; when it ends, reload to show the final state.
  const source = new EventSource(section.dataset.events);
  source.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
  source.addEventListener("done", () => { source.close(); window.location.reload(); });
  // the server ends a long stream with `timeout`; the browser reconnects by itself with Last-Event-ID
  return source;
}

function setText(id, text) {
  const el = document.getElementById(id);
  if (el) el.textContent = text;
}

function followJob(section) {
  follow(section, (p) => {
    setText("job-status", p.status);
    const bar = document.getElementById("job-progress");
    if (bar) { bar.max = p.total; bar.value = p.step; }
    setText("job-steps", `${p.step}/${p.total}`);
    const place = p.queue_position === null ? "—" : String(p.queue_position);
    setText("job-position", p.eta_s === null ? place : `${place} (about ${Math.round(p.eta_s)} s)`);
    setText("job-live", p.status === "running" ? `step ${p.step} of ${p.total}` : p.status);
    const preview = document.getElementById("job-preview");
    if (preview && typeof p.preview === "string" && p.preview.startsWith("data:image/jpeg;base64,")) {
      preview.src = p.preview;  // a data: URL of the worker's sketch (the page's policy allows data: images)
      preview.hidden = false;
    }
  });
}

function followBatch(section) {
  follow(section, (p) => {
    setText("batch-status", p.status);
    const counts = p.request_counts || {};
    for (const name of ["total", "queued", "running", "succeeded", "failed", "canceled"]) {
      if (name in counts) setText(`count-${name}`, String(counts[name]));
    }
    const bar = document.getElementById("batch-progress");
    if (bar && counts.total !== undefined) {
      bar.max = counts.total;
      bar.value = counts.succeeded + counts.failed + counts.canceled;
    }
    if (p.items_per_min !== undefined && p.items_per_min !== null) setText("batch-rate", `${p.items_per_min.toFixed(1)} items / min`);
    if (p.eta_s !== undefined && p.eta_s !== null) setText("batch-eta", `about ${Math.round(p.eta_s)} s`);
    setText("batch-live", `${counts.succeeded || 0} of ${counts.total || 0} done`);
  });
}

function infiniteScroll() {
  // When the "More" link scrolls into view, fetch the next page's tiles and put them in its place.
  const list = document.getElementById("tiles");
  if (!list || !("IntersectionObserver" in window)) return;
  let loading = false;
  const observer = new IntersectionObserver(async (entries) => {
    const link = list.querySelector("a.more");
    if (!link || loading || !entries.some((e) => e.isIntersecting)) return;
    loading = true;
    try {
      const response = await fetch(link.dataset.fragment, { credentials: "same-origin" });
      if (!response.ok) return;
      const html = await response.text();
      const item = link.closest("li");
      const template = document.createElement("template");
      template.innerHTML = html;  // the server's own escaped fragment (api/console/templates/_tiles.html)
      item.replaceWith(template.content);
      const next = list.querySelector("a.more");
      if (next) observer.observe(next);
    } finally {
      loading = false;
    }
  }, { rootMargin: "400px" });
  const first = list.querySelector("a.more");
  if (first) observer.observe(first);
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.querySelector("section.job[data-events]");
  if (job) followJob(job);
  const batch = document.querySelector("section.batch[data-events]");
  if (batch) followBatch(batch);
  infiniteScroll();
});
