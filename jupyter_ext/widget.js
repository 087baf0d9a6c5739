// The browser side of miniray's live map view (jupyter_ext/widget.py).
// Python sends HTML parts (a trait each) and the last log lines; the log pane is drawn here, so that the
// per-worker filter and the scroll position work while the kernel is busy with the map.

const PARTS = ["head", "lanes", "stragglers", "errors", "timeline"];

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "miniray-map";
  root.innerHTML = `
    <div class="miniray-header">
      <div class="miniray-part-head"></div>
      <button class="miniray-cancel" title="cancel this map (queued items are dropped)">Cancel</button>
    </div>
    <div class="miniray-part-lanes"></div>
    <div class="miniray-part-stragglers"></div>
    <div class="miniray-logbox">
      <div class="miniray-logbar">
        <b>logs</b>
        <select class="miniray-filter" title="show one worker's lines"></select>
        <span class="miniray-log-note"></span>
      </div>
      <div class="miniray-logs"></div>
    </div>
    <div class="miniray-part-errors"></div>
    <div class="miniray-part-timeline"></div>`;
  el.appendChild(root);
  const $ = (sel) => root.querySelector(sel);
  const pane = $(".miniray-logs");
  const filter = $(".miniray-filter");
  const note = $(".miniray-log-note");
  const logbox = $(".miniray-logbox");
  const cancel = $(".miniray-cancel");
  const shown = {};

  function renderParts() {
    for (const key of PARTS) {
      const html = model.get(key) || "";
      if (shown[key] === html) continue;
      shown[key] = html;
      const box = $(`.miniray-part-${key}`);
      const open = [...box.querySelectorAll("details")].map((d) => d.open);
      box.innerHTML = html;
      box.querySelectorAll("details").forEach((d, i) => {
        if (i < open.length) d.open = open[i];
      });
      box.style.display = html ? "" : "none";
    }
  }

  function renderCancel() {
    const state = model.get("state");
    cancel.style.display = model.get("cancellable") ? "" : "none";
    if (state !== "running") {
      cancel.disabled = true;
      cancel.textContent = state;
    }
  }

  function renderFilter() {
    const workers = model.get("log_workers") || [];
    const have = [...filter.options].slice(1).map((o) => o.value);
    if (filter.options.length && have.join("\n") === workers.join("\n")) return;
    const keep = filter.value;
    filter.replaceChildren(new Option("all workers", ""));
    for (const w of workers) filter.add(new Option(w, w));
    filter.value = workers.includes(keep) ? keep : "";
  }

  // at the bottom (or no scrollbar yet): new lines scroll into view; else the reader's place
  // is kept: the first line they see stays where it is
  const atBottom = () => pane.scrollHeight - pane.scrollTop - pane.clientHeight < 4;

  function renderLogs(follow) {
    const lines = model.get("logs") || [];
    logbox.style.display = lines.length ? "" : "none";
    note.textContent = model.get("log_note") || "";
    if (follow === undefined) follow = atBottom();
    let anchor = null;
    let offset = 0;
    if (!follow) {
      for (const line of pane.children) {
        if (line.offsetTop + line.offsetHeight > pane.scrollTop) {
          anchor = line.dataset.seq;
          offset = line.offsetTop - pane.scrollTop;
          break;
        }
      }
    }
    const only = filter.value;
    const frag = document.createDocumentFragment();
    for (const [seq, worker, text, stderr] of lines) {
      if (only && worker !== only) continue;
      const div = document.createElement("div");
      div.dataset.seq = seq;
      div.dataset.worker = worker;
      if (stderr) div.className = "miniray-stderr";
      div.textContent = text;
      frag.appendChild(div);
    }
    pane.replaceChildren(frag);
    if (follow) {
      pane.scrollTop = pane.scrollHeight;
    } else if (anchor !== null) {
      const line = pane.querySelector(`[data-seq="${anchor}"]`);
      if (line) pane.scrollTop = line.offsetTop - offset;
    }
  }

  const onLogs = () => renderLogs();
  cancel.addEventListener("click", () => {
    cancel.disabled = true;
    cancel.textContent = "cancelling";
    model.send({ event: "cancel" });
  });
  filter.addEventListener("change", () => renderLogs(true));
  for (const key of PARTS) model.on(`change:${key}`, renderParts);
  model.on("change:state", renderCancel);
  model.on("change:cancellable", renderCancel);
  model.on("change:log_workers", renderFilter);
  model.on("change:logs", onLogs);
  model.on("change:log_note", onLogs);
  renderParts();
  renderCancel();
  renderFilter();
  renderLogs(true);
  return () => {
    for (const key of PARTS) model.off(`change:${key}`, renderParts);
    model.off("change:state", renderCancel);
    model.off("change:cancellable", renderCancel);
    model.off("change:log_workers", renderFilter);
    model.off("change:logs", onLogs);
    model.off("change:log_note", onLogs);
  };
}

export default { render };
