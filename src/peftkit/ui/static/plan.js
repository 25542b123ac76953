// Plan: `peftkit plan` as a form. The estimate comes from the planner itself (POST /api/plan); the page draws
// the terms as bars, the GPU table, the recommendation and the changes that make a setup fit.
"use strict";

Pages.plan = (() => {
  let ready = false;
  const form = () => document.getElementById("plan-form");

  function fillSelect(select, values, chosen) {
    select.textContent = "";
    for (const v of values) select.appendChild(el("option", {value: v, selected: v === chosen}, v));
  }

  async function setup() {
    const c = await api("/api/plan/choices");
    const f = form();
    fillSelect(f.preset, c.presets, c.defaults.model);
    fillSelect(f.method, c.methods, c.defaults.method);
    fillSelect(f.optimizer, c.optimizers, c.defaults.optimizer);
    fillSelect(f.dtype, c.dtypes, c.defaults.dtype);
    f.addEventListener("submit", e => { e.preventDefault(); estimate(); });
    ready = true;
  }

  function request() {
    const f = form();
    return {model: f.config.value.trim() || f.preset.value, method: f.method.value, r: +f.r.value,
            target_modules: f.target_modules.value, batch_size: +f.batch_size.value, seq_len: +f.seq_len.value,
            optimizer: f.optimizer.value, dtype: f.dtype.value, gpus: +f.gpus.value,
            gradient_checkpointing: f.gradient_checkpointing.checked};
  }

  async function estimate() {
    showError("");
    let p;
    try { p = await postJSON("/api/plan", request()); } catch (e) { return; }
    const total = document.getElementById("plan-total");
    total.textContent = fmt.gib(p.total_bytes);
    total.dataset.gib = p.total_gib;
    const s = p.settings;
    document.getElementById("plan-setup").textContent =
      `${p.model}: ${s.method}${s.targets ? ` r=${s.r} on ${s.targets.join(", ")}` : ""}; batch ${s.batch_size} x ` +
      `${s.seq_len} tokens; ${s.dtype}; ${s.optimizer}; gradient checkpointing ${s.gradient_checkpointing ? "on" : "off"}`;
    const items = Object.entries(p.parts_bytes).map(([k, v]) =>
      ({label: k, value: v, text: `${fmt.gib(v)}  (${(100 * v / p.total_bytes).toFixed(1)}%)`}));
    Charts.bars(document.getElementById("plan-chart"), items, {});
    const params = document.getElementById("plan-params");
    params.textContent = `trainable parameters: ${fmt.int(p.trainable_params)} of ${fmt.int(p.total_params)} ` +
      `(${(100 * p.trainable_share).toFixed(3)}%); output file ${fmt.gib(p.output_file_bytes)}`;
    params.dataset.trainable = p.trainable_params;
    document.getElementById("plan-rec").textContent = p.recommendation;
    const fixes = document.getElementById("plan-fixes");
    fixes.textContent = "";
    if (p.fixes.length) {
      fixes.appendChild(el("p", {}, `It does not fit ${p.target}; each of these changes alone makes it fit:`));
      fixes.appendChild(el("ul", {}, p.fixes.map(x => el("li", {},
        `${x.change}: ${x.total_gib.toFixed(2)} GiB (saves ${x.saving_gib.toFixed(2)} GiB, ${x.fit})`))));
    }
    setRows(document.querySelector("#gpu-table tbody"), p.gpus.map(g => el("tr", {"data-gpu": g.gpu},
      el("td", {}, g.gpu), el("td", {class: "num"}, `${g.memory_gib} GiB`),
      el("td", {}, el("span", {class: `badge fit ${g.one_gpu}`}, g.one_gpu)),
      el("td", {class: "num"}, `${g.headroom_gib.toFixed(2)} GiB`),
      el("td", {class: "num"}, g.gpus_sharded === undefined ? "–" : fmt.value(g.gpus_sharded)))));
    document.getElementById("gpu-legend").textContent = p.fit_legend;
  }

  return {
    async show() {
      try {
        if (!ready) await setup();
        await estimate();
      } catch (e) { /* shown */ }
    },
  };
})();
