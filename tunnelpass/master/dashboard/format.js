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
  const part = (text, special) => (special.test(text) ? JSON.stringify(text) : text);
  return Object.entries(tags || {}).map(([k, v]) => {
    const key = part(k, /[,="]|^\s|\s$|^$/);
    return v === "" ? key : `${key}=${part(v, /[,"]|^\s|\s$/)}`;
  }).join(", ");
}

/** "k=v, k2=v2" -> {k: "v", k2: "v2"}; a name or value holding , = " or
 *  edge spaces is written in "JSON quotes" (formatTags does), so every tag
 *  the API holds survives an edit.  Throws Error naming the bad item. */
export function parseTags(text) {
  const tags = Object.create(null);  // "__proto__" is a tag name like any other
  const src = String(text);
  let i = 0;
  const skip = () => { while (i < src.length && /\s/.test(src[i])) i += 1; };
  const part = (stops) => {
    skip();
    if (src[i] === '"') {
      let j = i + 1;
      while (j < src.length && src[j] !== '"') j += src[j] === "\\" ? 2 : 1;
      if (j >= src.length) throw new Error("a quoted tag name or value is not closed");
      let value;
      try { value = JSON.parse(src.slice(i, j + 1)); } catch (err) { throw new Error(`bad quoted text ${src.slice(i, j + 1)}`); }
      i = j + 1;
      skip();
      return value;
    }
    const start = i;
    while (i < src.length && !stops.includes(src[i])) i += 1;
    return src.slice(start, i).trim();
  };
  while (i < src.length) {
    skip();
    if (i >= src.length) break;
    if (src[i] === ",") { i += 1; continue; }
    const start = i;
    const key = part(",=");
    const value = src[i] === "=" ? (i += 1, part(",")) : "";
    const item = src.slice(start, i).trim();
    if (i < src.length && src[i] !== ",") throw new Error(`tag "${item}": put "quotes" around a name or value holding , = or "`);
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
  // The master puts the level first ("[warn] ..."): that wins over any
  // "#debug]" quoted further on in the line.
  const found = LEADING.exec(text) || AFTER_TIME.exec(text) || TAGGED.exec(text);
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
