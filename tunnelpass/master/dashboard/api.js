// The master's API: the key (sessionStorage only), JSON requests with the
// X-API-Key header, and the event stream read with fetch() (EventSource
// cannot send a header; the key never goes in a URL or a cookie).

const BASE = new URL("../v1/", import.meta.url);
const STORAGE = "tunnelpass.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  try { return sessionStorage.getItem(STORAGE) || ""; } catch (err) { return ""; }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(STORAGE, key); else sessionStorage.removeItem(STORAGE);
  } catch (err) { /* storage disabled: the key lives only in this page */ }
}

let unauthorized = () => {};

/** What to do when the key is refused (the app signs out). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), BASE);
}

/** One API call -> the parsed JSON (null for 204); ApiError with the API's message. */
export async function api(method, path, body, key = getKey()) {
  const headers = {"X-API-Key": key};
  const init = {method, headers, cache: "no-store", credentials: "omit"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (err) {
    throw new ApiError(0, "Cannot reach the master (network error)");
  }
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const message = (data && typeof data.error === "string") ? data.error : `HTTP ${response.status}`;
    if (response.status === 401 && key === getKey() && key) unauthorized(message);
    throw new ApiError(response.status, message);
  }
  return data;
}

/** Parse Server-Sent Events from *buffer* -> {frames: [{event, data, retry}], rest}. */
export function parseFrames(buffer) {
  const frames = [];
  const text = buffer.replace(/\r\n?/g, "\n");
  let start = 0;
  for (;;) {
    const end = text.indexOf("\n\n", start);
    if (end < 0) break;
    const block = text.slice(start, end);
    start = end + 2;
    const frame = {event: "message", data: null, retry: null};
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (name === "event") frame.event = value;
      else if (name === "data") data.push(value);
      else if (name === "retry" && /^\d+$/.test(value)) frame.retry = Number(value);
    }
    if (data.length) frame.data = data.join("\n");
    if (frame.data !== null || frame.retry !== null) frames.push(frame);
  }
  return {frames, rest: text.slice(start)};
}

const MAX_BUFFER = 4 * 1024 * 1024;
/** No byte for this long (three of the master's 15 s keep-alives): reconnect. */
const SILENCE_LIMIT = 45000;

/** The live stream: calls onOpen() at each (re)connection, onEvent(data) per
 *  `event: instance` frame, onState("live" | "reconnecting"); reconnects after
 *  the server's retry; a 401 calls the unauthorized handler and stops. */
export class EventStream {
  constructor({onOpen, onEvent, onState}) {
    this.onOpen = onOpen;
    this.onEvent = onEvent;
    this.onState = onState;
    this.retry = 1000;
    this.stopped = false;
    this.controller = null;
  }

  start() {
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    while (!this.stopped) {
      try {
        await this.once();
      } catch (err) {
        if (this.controller) this.controller.abort();  // never leave a broken stream open
        if (err instanceof ApiError && err.status === 401) {
          this.stopped = true;
          unauthorized(err.message);
          return;
        }
      }
      if (this.stopped) return;
      this.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, this.retry));
    }
  }

  async once() {
    this.controller = new AbortController();
    const response = await fetch(apiUrl("events"), {
      headers: {"X-API-Key": getKey(), Accept: "text/event-stream"},
      cache: "no-store", credentials: "omit", signal: this.controller.signal,
    });
    if (!response.ok || !response.body) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
      throw new ApiError(response.status, message);
    }
    this.onOpen();
    this.onState("live");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    // The master sends a keep-alive every 15 s: three missed means a dead
    // connection or a frozen master, so reconnect (and say so) instead of
    // showing stale figures as live.
    let watchdog = null;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => this.controller.abort(), SILENCE_LIMIT);
    };
    arm();
    try {
      await this.read(reader, decoder, arm);
    } finally {
      clearTimeout(watchdog);
    }
  }

  async read(reader, decoder, arm) {
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done || this.stopped) break;
      arm();
      buffer += decoder.decode(value, {stream: true});
      if (buffer.length > MAX_BUFFER) throw new Error("event frame too large");
      const {frames, rest} = parseFrames(buffer);
      buffer = rest;
      for (const frame of frames) {
        if (frame.retry !== null) this.retry = Math.min(Math.max(frame.retry, 200), 60000);
        if (frame.event !== "instance" || frame.data === null) continue;
        let data;
        try { data = JSON.parse(frame.data); } catch (err) { continue; }
        if (data && typeof data === "object") this.onEvent(data);
      }
    }
  }
}
