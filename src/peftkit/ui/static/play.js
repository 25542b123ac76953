// Playground: one prompt to the base and to several adapters at once, each answer streamed into its own
// column. The page speaks OpenAI's API under /api/play/v1 (stream: true, server-sent events), answered by
// the base loaded in the console's process or relayed to a running `peftkit serve`.
"use strict";

Pages.play = (() => {
  let info = null;

  async function setup() {
    info = await api("/api/playground");
    document.getElementById("play-mode").textContent =
      info.mode === "proxy" ? `relayed to ${info.url}` : info.mode === "local" ? "in this process" : "off";
    const hint = document.getElementById("play-hint");
    hint.hidden = info.mode !== "off";
    hint.textContent = info.hint || "";
    const form = document.getElementById("play-form");
    form.max_tokens.max = info.max_tokens;
    if (info.mode === "off") { form.querySelector("button").disabled = true; return; }
    const models = await api("/api/play/v1/models");
    const box = document.getElementById("play-models");
    box.textContent = "";
    models.data.forEach((m, i) => box.appendChild(el("label", {},
      el("input", {type: "checkbox", name: "model", value: m.id, checked: i < 3}), ` ${m.id}`)));
    form.addEventListener("submit", e => { e.preventDefault(); sendAll(); });
  }

  function sendAll() {
    const form = document.getElementById("play-form");
    const models = [...form.querySelectorAll("input[name=model]:checked")].map(i => i.value);
    const columns = document.getElementById("play-columns");
    columns.textContent = "";
    if (!models.length) return showError("tick at least one model");
    showError("");
    const chat = form.chat.checked, prompt = form.prompt.value;
    const body = {max_tokens: +form.max_tokens.value, temperature: +form.temperature.value, stream: true};
    Object.assign(body, chat ? {messages: [{role: "user", content: prompt}]} : {prompt});
    for (const model of models) {
      const out = el("div", {class: "out"}), foot = el("div", {class: "foot"}, "waiting…");
      columns.appendChild(el("div", {class: "card column", "data-model": model, "data-state": "streaming"},
                             el("h3", {}, model), out, foot));
      stream(model, chat, body, out, foot);
    }
  }

  // POST one request and append each streamed piece of text to `out` as it arrives.
  async function stream(model, chat, body, out, foot) {
    const column = out.parentElement, started = performance.now();
    let pieces = 0, finish = null;
    const done = (state, text) => { column.dataset.state = state; column.dataset.pieces = pieces; foot.textContent = text; };
    try {
      const res = await fetch(`/api/play/v1/${chat ? "chat/completions" : "completions"}`, {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({...body, model})});
      if (!res.ok) {
        let message = `${res.status}`;
        try { const e = await res.json(); message = (e.error && e.error.message) || message; } catch (e) { /* keep */ }
        return done("error", `error: ${message}`);
      }
      const reader = res.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done: end} = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) return done("error", `error: ${chunk.error.message}`);
            const choice = (chunk.choices || [])[0];
            if (!choice) continue;
            const text = chat ? (choice.delta && choice.delta.content) : choice.text;
            if (text) { out.textContent += text; pieces += 1; }
            if (choice.finish_reason) finish = choice.finish_reason;
            foot.textContent = `${pieces} piece(s)…`;
          }
        }
      }
      done("done", `${pieces} piece(s), finish: ${finish || "?"}, ${((performance.now() - started) / 1000).toFixed(2)} s`);
    } catch (e) {
      done("error", `error: ${e.message}`);
    }
  }

  return {
    async show() {
      if (info) return;
      try { await setup(); } catch (e) { info = null; }
    },
  };
})();
