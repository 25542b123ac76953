// Runs: every run under the folder; the ticked runs' loss curves (polled from metrics.jsonl while the page is
// open, reading only what was appended), their summaries side by side, and their options (a diff for two).
"use strict";

Pages.runs = (() => {
  const POLL_MS = 2000;
  const state = {runs: [], selected: [], picked: false, metrics: {}, details: {}, timer: null};

  async function refreshList() {
    const data = await api("/api/runs");
    document.getElementById("root").textContent = data.root;
    const before = JSON.stringify(state.runs);
    state.runs = data.runs;
    const known = new Set(data.runs.map(r => r.path));
    const kept = state.selected.filter(p => known.has(p));
    const changed = kept.length !== state.selected.length || !state.picked;
    state.selected = kept;
    if (!state.picked && data.runs.length) { state.selected = [data.runs[0].path]; state.picked = true; }
    if (changed || before !== JSON.stringify(state.runs)) drawTable();  // unchanged: leave the rows (and a click) be
  }

  function drawTable() {
    document.getElementById("runs-count").textContent = `${state.runs.length} under the folder`;
    const rows = state.runs.map(r => {
      const on = state.selected.includes(r.path);
      const box = el("input", {type: "checkbox", checked: on, "aria-label": `compare ${r.path}`,
                               onchange: e => toggle(r.path, e.target.checked)});
      const step = r.max_steps ? `${r.step}/${r.max_steps}` : String(r.step ?? "–");
      return el("tr", {class: on ? "selected" : null, "data-run": r.path},
        el("td", {}, box), el("td", {class: "name"}, r.path),
        el("td", {}, el("span", {class: `badge ${r.status}`}, r.status), r.problem ? ` ${r.problem}` : null),
        el("td", {class: "method"}, r.method ?? "–"), el("td", {class: "num r"}, fmt.value(r.r)),
        el("td", {class: "num lr"}, fmt.value(r.lr)), el("td", {class: "num step"}, step),
        el("td", {class: "num last-loss", "data-value": r.last_loss ?? ""}, fmt.loss(r.last_loss)),
        el("td", {class: "num val-loss", "data-value": r.val_loss ?? ""}, fmt.loss(r.val_loss)));
    });
    setRows(document.querySelector("#runs-table tbody"), rows);
  }

  function toggle(path, on) {
    state.selected = on ? [...state.selected.filter(p => p !== path), path] : state.selected.filter(p => p !== path);
    drawTable();
    refreshSelected(true);
  }

  async function pollMetrics(path) {
    const m = state.metrics[path] || (state.metrics[path] = {offset: 0, rows: []});
    for (let i = 0; i < 20; i++) {  // a long file comes in pieces
      const data = await api(`/api/run/metrics?path=${encodeURIComponent(path)}&offset=${m.offset}`);
      if (data.offset < m.offset) m.rows = [];  // the file was replaced: the run started over
      m.rows.push(...data.rows);
      const grew = data.offset !== m.offset;
      m.offset = data.offset;
      if (!data.more || !grew) return grew || data.rows.length > 0;
    }
    return true;
  }

  async function refreshSelected(force) {
    let changed = force, reloaded = force;
    for (const path of state.selected) {
      const run = state.runs.find(r => r.path === path);
      const old = state.details[path];
      if (!old || force || old.status !== (run && run.status)) {
        state.details[path] = await api(`/api/run?path=${encodeURIComponent(path)}`);
        reloaded = true;
      }
      if (await pollMetrics(path)) changed = true;
    }
    if (changed) drawChart();
    if (reloaded) { drawSummaries(); await drawOptions(); }
  }

  function drawChart() {
    const series = [], notes = [];
    for (const [i, path] of state.selected.entries()) {
      const rows = (state.metrics[path] || {rows: []}).rows, color = Charts.PALETTE[i % Charts.PALETTE.length];
      const train = rows.filter(r => typeof r.loss === "number" && typeof r.step === "number").map(r => [r.step, r.loss]);
      const val = rows.filter(r => typeof r.val_loss === "number" && typeof r.step === "number").map(r => [r.step, r.val_loss]);
      series.push({name: `${path} loss`, points: train, color});
      if (val.length) series.push({name: `${path} val`, points: val, color, dashed: true, markers: true});
      const last = train.length ? train[train.length - 1] : null;
      notes.push(el("div", {class: "points", "data-run": path, "data-count": train.length, "data-last": last ? last[1] : ""},
        `${path}: ${train.length} training loss point(s)`, last ? `, last ${fmt.loss(last[1])} at step ${last[0]}` : "",
        val.length ? `; ${val.length} validation point(s), last ${fmt.loss(val[val.length - 1][1])}` : ""));
    }
    Charts.line(document.getElementById("loss-chart"), series,
                {xLabel: "optimizer step", yLabel: "loss", empty: "tick a run to see its loss curve"});
    const box = document.getElementById("loss-points");
    box.textContent = "";
    notes.forEach(n => box.appendChild(n));
    const live = state.selected.some(p => (state.runs.find(r => r.path === p) || {}).status === "running");
    document.getElementById("loss-status").textContent = live ? "live: updated every 2 s" : "";
  }

  function drawSummaries() {
    const box = document.getElementById("summaries");
    box.textContent = "";
    const runs = state.selected.map(p => state.details[p]).filter(Boolean);
    if (!runs.length) return box.appendChild(el("p", {class: "muted"}, "tick a run"));
    const keys = [...new Set(runs.flatMap(d => d.summary_keys))];
    const head = el("tr", {}, el("th", {}, ""), runs.map(d => el("th", {class: "num"}, d.path)));
    const body = keys.map(k => el("tr", {"data-key": k}, el("td", {}, k),
      runs.map(d => el("td", {class: "num", "data-value": d.summary ? JSON.stringify(d.summary[k] ?? null) : ""},
                       d.summary ? fmt.short(d.summary[k]) : `(${d.status})`))));
    if (!keys.length) body.push(el("tr", {}, el("td", {colspan: runs.length + 1, class: "muted"},
                                                    "no summary yet: a run writes summary.json when it finishes")));
    box.appendChild(el("table", {class: "data", id: "summary-table"}, el("thead", {}, head), el("tbody", {}, body)));
  }

  async function drawOptions() {
    const box = document.getElementById("options"), title = document.getElementById("options-title");
    box.textContent = "";
    const runs = state.selected.map(p => state.details[p]).filter(d => d && d.options);
    if (runs.length === 1) {
      title.textContent = `Options of ${runs[0].path}`;
      const rows = Object.entries(runs[0].options).map(([k, v]) => el("tr", {"data-key": k}, el("td", {}, k),
                                                                        el("td", {class: "value"}, fmt.value(v))));
      return box.appendChild(el("table", {class: "data", id: "options-table"}, el("tbody", {}, rows)));
    }
    if (runs.length === 2) {
      const [a, b] = runs;
      const d = await api(`/api/runs/diff?a=${encodeURIComponent(a.path)}&b=${encodeURIComponent(b.path)}`);
      title.textContent = `Options: ${d.changed.length} differ between ${a.path} and ${b.path} (${d.same} the same)`;
      const rows = d.changed.map(c => el("tr", {class: "changed", "data-key": c.key}, el("td", {}, c.key),
        el("td", {class: "diff-a"}, fmt.value(c.a)), el("td", {class: "diff-b"}, fmt.value(c.b))));
      for (const [side, only] of [["a", d.only_a], ["b", d.only_b]]) {
        for (const [k, v] of Object.entries(only)) rows.push(el("tr", {class: "changed", "data-key": k}, el("td", {}, k),
          el("td", {class: "diff-a"}, side === "a" ? fmt.value(v) : "(absent)"),
          el("td", {class: "diff-b"}, side === "b" ? fmt.value(v) : "(absent)")));
      }
      const head = el("tr", {}, el("th", {}, "option"), el("th", {}, a.path), el("th", {}, b.path));
      return box.appendChild(el("table", {class: "data", id: "diff-table"}, el("thead", {}, head), el("tbody", {}, rows)));
    }
    if (!runs.length) { title.textContent = "Options"; return; }
    const keys = [...new Set(runs.flatMap(d => Object.keys(d.options)))].sort();
    const differ = keys.filter(k => new Set(runs.map(d => JSON.stringify(d.options[k]))).size > 1);
    title.textContent = `Options: ${differ.length} differ among ${runs.length} runs`;
    const head = el("tr", {}, el("th", {}, "option"), runs.map(d => el("th", {}, d.path)));
    const rows = differ.map(k => el("tr", {class: "changed", "data-key": k}, el("td", {}, k),
                                    runs.map(d => el("td", {}, fmt.value(d.options[k])))));
    box.appendChild(el("table", {class: "data", id: "diff-table"}, el("thead", {}, head), el("tbody", {}, rows)));
  }

  async function tick() {
    try {
      await refreshList();
      await refreshSelected(false);
    } catch (e) { /* shown by api(); try again at the next tick */ }
    if (state.timer !== null) state.timer = setTimeout(tick, POLL_MS);
  }

  return {
    async show() {
      state.timer = 0;
      try {
        await refreshList();
        await refreshSelected(true);
      } catch (e) { /* shown */ }
      if (state.timer !== null) state.timer = setTimeout(tick, POLL_MS);
    },
    hide() { clearTimeout(state.timer); state.timer = null; },
  };
})();
