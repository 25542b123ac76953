// The console's shell: tabs (the URL's #hash picks the page), the API helper, DOM and number helpers.
// Each page script registers {show, hide} in Pages; show() runs when its tab opens, hide() when it closes.
"use strict";

const Pages = {};

// An element with attributes and children (strings become text nodes: data is never parsed as HTML).
function el(tag, attrs, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    n.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return n;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// JSON from the console's API; an error answer is shown at the top of the page and thrown.
async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const message = (body && body.error && body.error.message) || `${res.status} ${res.statusText}`;
    showError(message);
    throw new Error(message);
  }
  return body;
}

function postJSON(path, data) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)});
}

const fmt = {
  num(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); },
  loss(v) { return fmt.num(v, 4); },
  int(v) { return v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"); },
  gib(bytes) {
    const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
    for (const [u, s] of units) if (bytes >= s) return `${(bytes / s).toFixed(2)} ${u}`;
    return `${Math.round(bytes)} B`;
  },
  short(v) {  // a number to 6 significant digits; anything else as value() shows it
    return typeof v === "number" && !Number.isInteger(v) ? String(Number(v.toPrecision(6))) : fmt.value(v);
  },
  value(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  },
};

function setRows(tbody, rows) {
  tbody.textContent = "";
  for (const r of rows) tbody.appendChild(r);
}

let current = null;

function route() {
  const name = (location.hash || "#runs").slice(1);
  const page = Pages[name] ? name : "runs";
  if (current && current !== page && Pages[current].hide) Pages[current].hide();
  for (const section of document.querySelectorAll("section.page")) section.hidden = section.id !== `page-${page}`;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.page === page);
  showError("");
  current = page;
  Pages[page].show();
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
