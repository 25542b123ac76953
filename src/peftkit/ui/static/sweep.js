// Sweeps: each sweep under the folder; its finished trials as quality (eval loss) against cost (peak memory
// or seconds per step), the recommendation ringed in red, the limits dashed, and the ranked table.
"use strict";

Pages.sweep = (() => {
  const state = {sweeps: [], chosen: null, data: null, bound: false};

  async function load() {
    const data = await api("/api/sweeps");
    state.sweeps = data.sweeps;
    if (!state.sweeps.some(s => s.path === state.chosen)) state.chosen = state.sweeps.length ? state.sweeps[0].path : null;
    const list = document.getElementById("sweep-list");
    list.textContent = "";
    if (!state.sweeps.length) list.appendChild(el("li", {class: "muted"}, "no sweep.json under the folder"));
    for (const s of state.sweeps) {
      list.appendChild(el("li", {class: s.path === state.chosen ? "active" : null, "data-sweep": s.path,
                                 onclick: () => { state.chosen = s.path; load(); }},
        s.path, el("div", {class: "muted small"}, s.problem ||
          `${s.finished}/${s.trials} trials finished; recommended: ${s.recommended || "none"}`)));
    }
    if (state.chosen) {
      state.data = await api(`/api/sweep?path=${encodeURIComponent(state.chosen)}`);
      draw();
    }
  }

  function xAxis() {
    return document.querySelector("input[name=sweep-x]:checked").value;
  }

  function draw() {
    const d = state.data, x = xAxis();
    document.getElementById("sweep-title").textContent =
      `${d.path}: quality against cost` + (d.model ? ` (${d.model}, ${d.steps_per_trial ?? "?"} steps per trial)` : "");
    const ok = d.trials.filter(t => t.status === "ok" && t.eval_loss !== null && t[x] !== null);
    const points = ok.map(t => ({x: t[x], y: t.eval_loss, name: t.name, group: t.method,
                                 ring: t.name === d.recommendation.name,
                                 label: t.label + (t.exact_match !== null ? ` (${Math.round(100 * t.exact_match)}%)` : "")}));
    const limit = x === "peak_memory_mb" ? d.limits.max_memory_mb : d.limits.max_step_s;
    Charts.scatter(document.getElementById("sweep-chart"), points,
                   {xLabel: x === "peak_memory_mb" ? "peak memory (MB)" : "seconds per step",
                    yLabel: "eval loss (lower is better)", xLimit: limit});
    const rec = document.getElementById("sweep-rec");
    rec.textContent = d.recommendation.text || (d.recommendation.name ? `Recommended: ${d.recommendation.name}` : "No recommendation.");
    rec.dataset.name = d.recommendation.name || "";
    const extra = [];
    if (d.quality) extra.push(`quality: ${d.quality}`);
    if (d.rank_suggestion && d.rank_suggestion.median_rank) extra.push(`rank suggestion: r=${d.rank_suggestion.median_rank}`);
    for (const url of d.studies) extra.push(`Optuna study: optuna-dashboard ${url}`);
    document.getElementById("sweep-extra").textContent = extra.join(" · ");
    const rows = [...d.trials, ...d.skipped].map(t => el("tr", {"data-trial": t.name, class: t.name === d.recommendation.name ? "selected" : null},
      el("td", {class: "num"}, fmt.value(t.rank)), el("td", {}, t.label),
      el("td", {class: "num eval-loss"}, fmt.loss(t.eval_loss)),
      el("td", {class: "num"}, t.exact_match === null ? "–" : `${Math.round(100 * t.exact_match)}%`),
      el("td", {class: "num"}, fmt.num(t.peak_memory_mb, 0)), el("td", {class: "num"}, fmt.num(t.step_s, 2)),
      el("td", {class: "num"}, fmt.int(t.trainable_params)),
      el("td", {}, el("span", {class: `badge ${t.status}`}, t.status || "?"), " ", t.error || t.reason || "")));
    setRows(document.querySelector("#trials-table tbody"), rows);
  }

  return {
    async show() {
      if (!state.bound) {
        for (const r of document.querySelectorAll("input[name=sweep-x]")) r.addEventListener("change", () => state.data && draw());
        state.bound = true;
      }
      try { await load(); } catch (e) { /* shown */ }
    },
  };
})();
