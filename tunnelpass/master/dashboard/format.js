// Pure formatting and parsing helpers (no DOM).

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/** 1536 -> "1.5 KiB" */
export function bytes(n) {
  let value = Number(n) || 0;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) { value /= 1024; unit += 1; }
  return `${unit === 0 ? value.toFixed(0) : value.toFixed(value < 10 ? 2 : 1)} ${UNITS[unit]}`;
}

/** bytes per second -> "1.5 KiB/s" */
export function rate(n) {
  return `${bytes(n)}/s`;
}

/** seconds -> "3d 4h", "5h 2m", "7m 3s", "12s" */
export function duration(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const d = Math.floor(s / 86400), hr = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = s % 60;
  if (d) return `${d}d ${hr}h`;
  if (hr) return `${hr}h ${m}m`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}

export function ping(ms) {
  const n = Number(ms) || 0;
  return n > 0 ? `${n} ms` : "\u2014";
}

/** Received and sent bytes of an instance (TCP + UDP). */
export function totals(inst) {
  return {rx: (inst.tcprx || 0) + (inst.udprx || 0), tx: (inst.tcptx || 0) + (inst.udptx || 0)};
}

/** The key of a URL (the userinfo) replaced by ******** */
export function maskUrl(url) {
  const text = String(url || "");
  const sep = text.indexOf("://");
  if (sep < 0) return text;
  const rest = text.slice(sep + 3);
  const ends = ["/", "?", "#"].map((c) => rest.indexOf(c)).filter((i) => i >= 0);
  const end = ends.length ? Math.min(...ends) : rest.length;
  const netloc = rest.slice(0, end);
  const at = netloc.lastIndexOf("@");
  if (at < 0) return text;
  return `${text.slice(0, sep)}://********@${netloc.slice(at + 1)}${rest.slice(end)}`;
}

/** NodePass's flow of an instance: its type and mode number. */
export function flow(inst) {
  const modes = inst.type === "server" ? ["auto", "receive", "send"] : ["auto", "local", "tunnel"];
  return modes[inst.mode] || String(inst.mode ?? "");
}

/** {k: "v"} -> "k=v, k2=v2" */
export function formatTags(tags) {
  return Object.entries(tags || {}).map(([k, v]) => (v === "" ? k : `${k}=${v}`)).join(", ");
}

/** "k=v, k2=v2" -> {k: "v", k2: "v2"}; throws Error naming the bad item. */
export function parseTags(text) {
  const tags = {};
  for (const raw of String(text).split(",")) {
    const item = raw.trim();
    if (!item) continue;
    const eq = item.indexOf("=");
    const key = (eq < 0 ? item : item.slice(0, eq)).trim();
    const value = eq < 0 ? "" : item.slice(eq + 1).trim();
    if (!key) throw new Error(`tag "${item}" has no name (write name=value)`);
    if (Object.prototype.hasOwnProperty.call(tags, key)) throw new Error(`tag "${key}" is given twice`);
    tags[key] = value;
  }
  return tags;
}

export const LEVELS = ["debug", "info", "warn", "error"];

const WORD = "(debug|info|warn|warning|error|critical|fatal)";
const TAGGED = new RegExp(`#${WORD}\\]`, "i");              // "[namespace#warn] text"
const AFTER_TIME = new RegExp(`^\\d[\\d:T.,+\\-Z]*\\s+\\[?${WORD}\\b`, "i");  // "2026-... WARN text", "12:00 [warn] text"
const LEADING = new RegExp(`^\\[?${WORD}(\\]|:|\\s)`, "i");    // "error: text", "[warn] text"

/** The level of a log line: "... [namespace#warn] text" (the text log),
 *  else the word after the time, else a leading level word; default info. */
export function logLevel(line) {
  const text = String(line);
  const found = TAGGED.exec(text) || AFTER_TIME.exec(text) || LEADING.exec(text);
  if (!found) return "info";
  const level = found[1].toLowerCase();
  if (level === "warning") return "warn";
  if (level === "critical" || level === "fatal") return "error";
  return level;
}

/** 32 random bytes as 64 hex digits. */
export function strongKey() {
  const bytes32 = new Uint8Array(32);
  crypto.getRandomValues(bytes32);
  return Array.from(bytes32, (b) => b.toString(16).padStart(2, "0")).join("");
}
