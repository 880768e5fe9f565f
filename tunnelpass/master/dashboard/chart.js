// The throughput chart: rx/tx bytes per second over the last 5 minutes,
// drawn as SVG (no library). data-points = samples plotted.

import {clear, s} from "./dom.js";
import {rate} from "./format.js";
import {WINDOW} from "./store.js";

const W = 600, H = 200, LEFT = 78, BOTTOM = 20, TOP = 8, RIGHT = 8;  // LEFT: room for "1023.9 KiB/s"

/** A nice upper bound for the y axis. */
function niceMax(value) {
  if (value <= 0) return 1024;
  const exp = 2 ** Math.ceil(Math.log2(value));
  return exp * (value > exp * 0.75 ? 1 : 0.75);
}

export function makeChart() {
  const svg = s("svg", {class: "chart", testid: "detail-chart", viewBox: `0 0 ${W} ${H}`,
    preserveAspectRatio: "none", role: "img", "aria-label": "Throughput, last 5 minutes", "data-points": "0"});
  return svg;
}

/** Redraw *svg* from *points* [{t, rx, tx}] (t in seconds) ending at *now*. */
export function drawChart(svg, points, now) {
  clear(svg);
  const start = now - WINDOW;
  const shown = points.filter((p) => p.t >= start);
  const top = niceMax(Math.max(0, ...shown.map((p) => Math.max(p.rx, p.tx))));
  const x = (t) => LEFT + ((t - start) / WINDOW) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - v / top) * (H - TOP - BOTTOM);
  for (const fraction of [0, 0.5, 1]) {
    const yy = y(top * fraction);
    svg.append(s("line", {class: "grid", x1: LEFT, x2: W - RIGHT, y1: yy, y2: yy}));
    svg.append(s("text", {class: "axis", x: LEFT - 6, y: yy + 4, "text-anchor": "end"}, rate(top * fraction)));
  }
  for (const [t, text] of [[start, "-5 min"], [start + WINDOW / 2, "-2.5 min"], [now, "now"]]) {
    svg.append(s("text", {class: "axis", x: x(t), y: H - 4,
      "text-anchor": t === start ? "start" : t === now ? "end" : "middle"}, text));
  }
  for (const name of ["rx", "tx"]) {
    if (!shown.length) continue;
    const coords = shown.map((p) => `${x(p.t).toFixed(1)},${y(p[name]).toFixed(1)}`);
    if (shown.length === 1) coords.unshift(`${LEFT},${y(shown[0][name]).toFixed(1)}`);
    svg.append(s("polyline", {class: name, points: coords.join(" ")}));
  }
  svg.setAttribute("data-points", String(shown.length));
  const last = shown[shown.length - 1];
  svg.setAttribute("aria-label", last
    ? `Throughput, last 5 minutes: now received ${rate(last.rx)}, sent ${rate(last.tx)}`
    : "Throughput, last 5 minutes: no samples yet");
}
