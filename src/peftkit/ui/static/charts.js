// Charts drawn as inline SVG: a line chart (loss curves), horizontal bars (memory terms), a scatter
// (quality against cost). No library: each draws into a container element and marks what it drew with
// data- attributes (series names, point counts) so that the page can be checked.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f6fdf", "#e0663a", "#1f8a4c", "#8e44ad", "#c0392b", "#16a2b8", "#b7791f", "#5a6270"];

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }

  // About `count` round tick values covering [lo, hi].
  function ticks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
    return String(+v.toPrecision(4));
  }

  function frame(container, width, height) {
    container.textContent = "";
    const svg = node("svg", {viewBox: `0 0 ${width} ${height}`, role: "img"});
    container.appendChild(svg);
    return svg;
  }

  function empty(container, message) {
    container.textContent = "";
    const d = document.createElement("div");
    d.className = "empty";
    d.textContent = message;
    container.appendChild(d);
  }

  // Axes with ticks for the domain [x0, x1] x [y0, y1]; returns the scale functions.
  function axes(svg, box, dom, labels) {
    const {left, top, width, height} = box;
    const sx = x => left + (x - dom.x0) / (dom.x1 - dom.x0 || 1) * width;
    const sy = y => top + height - (y - dom.y0) / (dom.y1 - dom.y0 || 1) * height;
    const g = node("g", {class: "axes", "font-size": 11, fill: "#6b7585"});
    for (const t of ticks(dom.y0, dom.y1, 5)) {
      g.appendChild(node("line", {x1: left, x2: left + width, y1: sy(t), y2: sy(t), stroke: "#e6e9ef"}));
      g.appendChild(node("text", {x: left - 6, y: sy(t) + 4, "text-anchor": "end"}, fmt(t)));
    }
    for (const t of ticks(dom.x0, dom.x1, 8)) {
      g.appendChild(node("line", {x1: sx(t), x2: sx(t), y1: top + height, y2: top + height + 4, stroke: "#999"}));
      g.appendChild(node("text", {x: sx(t), y: top + height + 17, "text-anchor": "middle"}, fmt(t)));
    }
    g.appendChild(node("rect", {x: left, y: top, width, height, fill: "none", stroke: "#c9d0db"}));
    g.appendChild(node("text", {x: left + width / 2, y: top + height + 34, "text-anchor": "middle"}, labels.x));
    g.appendChild(node("text", {x: 14, y: top + height / 2, "text-anchor": "middle",
                                transform: `rotate(-90 14 ${top + height / 2})`}, labels.y));
    svg.appendChild(g);
    return {sx, sy};
  }

  function domain(points, pad) {
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const dy = (y1 - y0) * pad, dx = (x1 - x0) * pad;
    return {x0: x0 - dx, x1: x1 + dx, y0: y0 - dy, y1: y1 + dy};
  }

  // series: [{name, points: [[x, y], ...], dashed, markers}]
  function line(container, series, opts) {
    const drawn = series.filter(s => s.points.length);
    if (!drawn.length) return empty(container, opts.empty || "no points yet");
    const W = 760, H = 300, box = {left: 60, top: 14, width: 560, height: 230};
    const svg = frame(container, W, H);
    const all = drawn.flatMap(s => s.points);
    const dom = domain(all, 0.04);
    const {sx, sy} = axes(svg, box, dom, {x: opts.xLabel, y: opts.yLabel});
    drawn.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      const path = node("path", {d, fill: "none", stroke: color, "stroke-width": 2,
                                 "data-series": s.name, "data-count": s.points.length, class: "series"});
      if (s.dashed) path.setAttribute("stroke-dasharray", "5 4");
      svg.appendChild(path);
      if (s.markers || s.points.length === 1) {
        for (const p of s.points) svg.appendChild(node("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color}));
      }
      const ly = box.top + 8 + i * 18;
      svg.appendChild(node("line", {x1: box.left + box.width + 12, x2: box.left + box.width + 32, y1: ly, y2: ly,
                                    stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 4" : "none"}));
      svg.appendChild(node("text", {x: box.left + box.width + 38, y: ly + 4, "font-size": 11, fill: "#1d2430"},
                           s.name.length > 20 ? s.name.slice(0, 19) + "…" : s.name));
    });
  }

  // items: [{label, value, text}], one horizontal bar each, scaled to the largest
  function bars(container, items, opts) {
    const shown = items.filter(it => it.value > 0);
    if (!shown.length) return empty(container, opts.empty || "nothing to show");
    const rowH = 26, W = 760, H = shown.length * rowH + 10, left = 170, width = 440;
    const svg = frame(container, W, H);
    const max = Math.max(...shown.map(it => it.value));
    shown.forEach((it, i) => {
      const y = 5 + i * rowH, w = Math.max(1, it.value / max * width);
      svg.appendChild(node("text", {x: left - 8, y: y + 16, "text-anchor": "end", "font-size": 12, fill: "#1d2430"},
                           it.label));
      svg.appendChild(node("rect", {x: left, y: y + 3, width: w, height: rowH - 8, rx: 3,
                                    fill: PALETTE[i % PALETTE.length], "data-label": it.label, class: "bar"}));
      svg.appendChild(node("text", {x: left + w + 6, y: y + 16, "font-size": 12, fill: "#1d2430"}, it.text));
    });
  }

  // points: [{x, y, label, group, ring}]; opts: {xLabel, yLabel, xLimit}
  function scatter(container, points, opts) {
    if (!points.length) return empty(container, opts.empty || "no finished trial with these numbers");
    const W = 760, H = 330, box = {left: 60, top: 14, width: 660, height: 260};
    const svg = frame(container, W, H);
    const xs = points.map(p => [p.x, p.y]);
    if (opts.xLimit) xs.push([opts.xLimit, points[0].y]);
    const dom = domain(xs, 0.08);
    const {sx, sy} = axes(svg, box, dom, {x: opts.xLabel, y: opts.yLabel});
    if (opts.xLimit) {
      svg.appendChild(node("line", {x1: sx(opts.xLimit), x2: sx(opts.xLimit), y1: box.top, y2: box.top + box.height,
                                    stroke: "#888", "stroke-dasharray": "6 4", class: "limit"}));
    }
    const groups = [...new Set(points.map(p => p.group))];
    points.forEach((p, i) => {
      const color = PALETTE[groups.indexOf(p.group) % PALETTE.length];
      const c = node("circle", {cx: sx(p.x), cy: sy(p.y), r: 5, fill: color, class: "point", "data-name": p.name});
      c.appendChild(node("title", {}, `${p.label}: ${fmt(p.y)} at ${fmt(p.x)}`));
      svg.appendChild(c);
      if (p.ring) svg.appendChild(node("circle", {cx: sx(p.x), cy: sy(p.y), r: 11, fill: "none", stroke: "#d62828",
                                                  "stroke-width": 2, class: "recommended", "data-name": p.name}));
      svg.appendChild(node("text", {x: sx(p.x) + 8, y: sy(p.y) + (i % 2 ? 13 : -6), "font-size": 11,
                                    fill: "#1d2430"}, p.label));
    });
  }

  return {line, bars, scatter, fmt, PALETTE};
})();
