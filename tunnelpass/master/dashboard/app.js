// The dashboard's shell: sign-in, the event stream, and the pages
// (#/instances, #/new, #/i/ID, #/edit/ID, #/info).

import {api, ApiError, EventStream, getKey, onUnauthorized, setKey} from "./api.js";
import {copyText, toast} from "./dom.js";
import {applyEvent, clearAll, resetInstances} from "./store.js";
import {instancesPage} from "./instances.js";
import {formPage} from "./form.js";
import {detailPage} from "./detail.js";
import {infoPage} from "./info.js";

const $ = (id) => document.getElementById(id);
let stream = null;
let cleanup = null;

function showSignIn(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("sign-in-error").textContent = message;
  $("key-input").value = "";
  $("key-input").focus();
}

/** Forget the key, stop the stream and show the sign-in screen. */
export function signOut(message = "", newKey = "") {
  setKey("");
  if (stream) stream.stop();
  stream = null;
  if (cleanup) cleanup();
  cleanup = null;
  clearAll();
  $("main").replaceChildren();
  $("rotated").hidden = !newKey;
  $("new-key").textContent = newKey;
  if (location.hash) history.replaceState(null, "", location.pathname);
  showSignIn(message);
}

async function signIn(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  const error = $("sign-in-error");
  if (!key) {
    error.textContent = "Enter the API key";
    return;
  }
  $("sign-in").disabled = true;
  error.textContent = "";
  try {
    await api("GET", "info", undefined, key);
    setKey(key);
    $("rotated").hidden = true;
    $("new-key").textContent = "";
    start();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) error.textContent = "Wrong key: the master refused it";
    else if (err instanceof ApiError && err.status === 429) error.textContent = `Too many wrong keys: ${err.message}`;
    else if (err instanceof ApiError && err.status === 0) error.textContent = "Network error: cannot reach the master";
    else error.textContent = `Sign-in failed: ${err.message}`;
    $("key-input").select();
  } finally {
    $("sign-in").disabled = false;
  }
}

function setLive(state) {
  const el = $("live");
  el.textContent = state === "live" ? "live" : "reconnecting\u2026";
  el.classList.toggle("on", state === "live");
}

function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  setLive("connecting");
  stream = new EventStream({onOpen: resetInstances, onEvent: applyEvent, onState: setLive}).start();
  if (!location.hash || location.hash === "#") location.hash = "#/instances";
  else route();
}

const PAGES = [
  [/^#\/instances$/, "nav-instances", () => instancesPage],
  [/^#\/new$/, "nav-new", () => formPage],
  [/^#\/info$/, "nav-info", () => infoPage],
  [/^#\/i\/([0-9a-f]{8})$/, "nav-instances", () => detailPage],
  [/^#\/edit\/([0-9a-f]{8})$/, "nav-instances", () => formPage],
];

function route() {
  if (!getKey() || !stream) return;
  if (cleanup) cleanup();
  cleanup = null;
  const hash = location.hash || "#/instances";
  let match = null;
  let page = null;
  let nav = "nav-instances";
  for (const [pattern, navId, get] of PAGES) {
    match = pattern.exec(hash);
    if (match) {
      page = get();
      nav = navId;
      break;
    }
  }
  if (!page) {
    location.replace("#/instances");
    return;
  }
  for (const id of ["nav-instances", "nav-new", "nav-info"]) {
    if (id === nav) $(id).setAttribute("aria-current", "page"); else $(id).removeAttribute("aria-current");
  }
  const main = $("main");
  main.replaceChildren();
  cleanup = page(main, {id: match[1] || null, signOut, navigate: (to) => { location.hash = to; }}) || null;
  if (document.activeElement === document.body || !main.contains(document.activeElement)) main.focus();
}

function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("copy-new-key").addEventListener("click", () => copyText($("new-key").textContent, "Key"));
  window.addEventListener("hashchange", route);
  onUnauthorized((message) => signOut(`Signed out: ${message}`));
  window.addEventListener("unhandledrejection", (event) => {
    const err = event.reason;
    if (err instanceof ApiError) {
      event.preventDefault();
      toast(err.message, true);
    }
  });
  if (getKey()) start(); else showSignIn();
}

init();
