// What the dashboard knows, fed by the event stream: the instances, their
// current rates (from successive counter updates), 5 minutes of rx/tx rate
// samples each, and their last 500 log lines.

import {logLevel, totals} from "./format.js";

export const WINDOW = 300;          // seconds of chart history
export const MAX_LOGS = 500;
const MIN_INTERVAL = 0.5;           // seconds between two counter readings for a rate

export const store = {
  instances: new Map(),   // id -> instance (masked view)
  rates: new Map(),       // id -> {rx, tx} bytes/s
  history: new Map(),     // id -> [{t, rx, tx}]
  logs: new Map(),        // id -> [{text, level}]
  baseline: new Map(),    // id -> {t, rx, tx}
  skew: 0,               // the master's clock minus this browser's, seconds
  listeners: new Set(),
  logListeners: new Set(),
};

/** Call *fn(id|null)* after each change; returns the unsubscribe function. */
export function subscribe(fn) {
  store.listeners.add(fn);
  return () => store.listeners.delete(fn);
}

/** Call *fn(id, entry)* for each new log line; returns the unsubscribe function. */
export function subscribeLogs(fn) {
  store.logListeners.add(fn);
  return () => store.logListeners.delete(fn);
}

let scheduled = new Set();
let pending = false;

function changed(id) {
  scheduled.add(id);
  if (pending) return;
  pending = true;
  queueMicrotask(() => {
    const ids = scheduled;
    scheduled = new Set();
    pending = false;
    for (const fn of store.listeners) fn(ids);
  });
}

/** A (re)connected stream: its initial frames are the whole truth. */
export function resetInstances() {
  store.instances.clear();
  changed(null);
}

export function clearAll() {
  for (const table of [store.instances, store.rates, store.history, store.logs, store.baseline]) table.clear();
  changed(null);
}

/** Seconds since the epoch of an event's RFC 3339 time (else now). */
function eventTime(text) {
  const t = Date.parse(text);
  return Number.isFinite(t) ? t / 1000 : Date.now() / 1000;
}

/** One `event: instance` frame's data. */
export function applyEvent(data) {
  const inst = data.instance;
  if (data.type === "shutdown" || !inst || typeof inst.id !== "string") return;
  const id = inst.id;
  if (data.type === "delete") {
    for (const table of [store.instances, store.rates, store.history, store.logs, store.baseline]) table.delete(id);
    changed(id);
    return;
  }
  if (data.type === "log") {
    addLog(id, typeof data.logs === "string" ? data.logs : "");
    if (store.instances.has(id)) store.instances.set(id, {...store.instances.get(id), ...inst});
    return;
  }
  store.instances.set(id, inst);
  const t = eventTime(data.time);
  store.skew = t - Date.now() / 1000;
  sample(id, inst, t);
  changed(id);
}

/** Keep the current instance view of an API answer (e.g. after a PATCH). */
export function putInstance(inst) {
  if (!inst || typeof inst.id !== "string" || !store.instances.has(inst.id)) return;
  store.instances.set(inst.id, inst);
  changed(inst.id);
}

function sample(id, inst, t) {
  const now = totals(inst);
  const last = store.baseline.get(id);
  if (!last) {
    store.baseline.set(id, {t, ...now});
    return;
  }
  const dt = t - last.t;
  if (dt < MIN_INTERVAL) {
    if (now.rx < last.rx || now.tx < last.tx) store.baseline.set(id, {t: last.t, ...now});
    return;
  }
  const rx = Math.max(0, (now.rx - last.rx) / dt);
  const tx = Math.max(0, (now.tx - last.tx) / dt);
  const current = inst.status === "running" ? {rx, tx} : {rx: 0, tx: 0};
  store.rates.set(id, current);
  store.baseline.set(id, {t, ...now});
  const points = store.history.get(id) || [];
  points.push({t, ...current});
  while (points.length && points[0].t < t - WINDOW) points.shift();
  store.history.set(id, points);
}

function addLog(id, text) {
  const lines = store.logs.get(id) || [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const entry = {text: line, level: logLevel(line)};
    lines.push(entry);
    if (lines.length > MAX_LOGS) lines.shift();
    for (const fn of store.logListeners) fn(id, entry);
  }
  store.logs.set(id, lines);
}
