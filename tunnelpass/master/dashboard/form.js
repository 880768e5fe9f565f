// The create/edit form: builds the instance URL from its fields, shows it,
// and puts the API's validation message next to the field it concerns.

import {api, ApiError} from "./api.js";
import {h, setText} from "./dom.js";
import {strongKey} from "./format.js";

export const PARAMS = {
  min: "client: minimum pool", max: "maximum pool", mode: "0 auto, 1/2 flow", type: "server: carrier 0-2",
  dial: "source IP or auto", dns: "e.g. 5m", read: "e.g. 10m", rate: "Mbit/s", slot: "max connections",
  proxy: "PROXY 0/1/2", block: "e.g. 1,2", notcp: "1: no TCP", noudp: "1: no UDP", lbs: "0/1/2", log: "debug..fatal",
  sni: "client, tls 2",
};

/** Which field an API message is about (else null: the form-wide error). */
export function fieldOf(message) {
  const m = String(message);
  if (/unknown URL query key/i.test(m)) return null;
  const param = /--(min-pool|max-pool|dns|read|rate|slot|sni|dial|block|lbs|proxy-protocol|type|log|no-tcp|no-udp)\b/.exec(m);
  if (param) {
    const name = {"min-pool": "min", "max-pool": "max", "proxy-protocol": "proxy", "no-tcp": "notcp",
      "no-udp": "noudp"}[param[1]] || param[1];
    return `param-${name}`;
  }
  if (/--tls 2 needs/.test(m)) return "crt";
  if (/--private-key/.test(m)) return "keyfile";
  if (/--cert\b|\bcrt\b|certificate/i.test(m)) return "crt";
  if (/--tls\b/.test(m)) return "tls";
  if (/tunnel key|has no key|\bkey is\b/i.test(m)) return "key";
  if (/URL needs the target/i.test(m)) return "target";
  if (/tunnel address|--tunnel\b/i.test(m)) return "tunnel";
  if (/--flow|\bflow\b/.test(m)) return "param-mode";
  if (/\balias\b/i.test(m)) return "alias";
  if (/target/i.test(m)) return "target";
  if (/key/i.test(m) && !/query key/i.test(m)) return "key";
  return null;
}

/** "server://KEY@HOST:PORT/TARGET?q" -> {type, key, tunnel, target, query: [[k, v]]} */
export function splitUrl(url) {
  const text = String(url || "");
  const sep = text.indexOf("://");
  const type = sep < 0 ? "server" : text.slice(0, sep).toLowerCase();
  let rest = sep < 0 ? text : text.slice(sep + 3);
  const q = rest.indexOf("?");
  const query = q < 0 ? "" : rest.slice(q + 1);
  rest = q < 0 ? rest : rest.slice(0, q);
  const slash = rest.indexOf("/");
  const authority = slash < 0 ? rest : rest.slice(0, slash);
  const target = slash < 0 ? "" : rest.slice(slash + 1);
  const at = authority.lastIndexOf("@");
  const decode = (v) => { try { return decodeURIComponent(v); } catch (err) { return v; } };
  return {type, key: at < 0 ? "" : decode(authority.slice(0, at)), tunnel: authority.slice(at + 1),
    target: decode(target), query: [...new URLSearchParams(query)]};
}

/** An instance URL -> the form's fields (unknown query keys kept in extra). */
export function fieldsFromUrl(url) {
  const parts = splitUrl(url);
  const f = {type: parts.type === "client" ? "client" : "server", key: parts.key, tunnel: parts.tunnel,
    target: parts.target, tls: "", crt: "", keyfile: "", params: {}, extra: []};
  for (const [k, v] of parts.query) {
    if (k === "tls") f.tls = v;
    else if (k === "crt") f.crt = v;
    else if (k === "key") f.keyfile = v;
    else if (PARAMS[k] !== undefined) f.params[k] = v;
    else f.extra.push([k, v]);
  }
  return f;
}

/** The fields -> the instance URL. */
export function buildUrl(f) {
  const key = f.key ? `${encodeURIComponent(f.key)}@` : "";
  const target = encodeURI(f.target).replace(/%5B/g, "[").replace(/%5D/g, "]");
  const query = [];
  if (f.tls !== "") query.push(["tls", f.tls]);
  if (f.crt) query.push(["crt", f.crt]);
  if (f.keyfile) query.push(["key", f.keyfile]);
  for (const name of Object.keys(PARAMS)) if (f.params[name]) query.push([name, f.params[name]]);
  for (const pair of f.extra) query.push(pair);
  const qs = query.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v).replace(/%2C/g, ",").replace(/%3A/g, ":")}`);
  return `${f.type}://${key}${f.tunnel}/${target}${qs.length ? `?${qs.join("&")}` : ""}`;
}

export function formPage(main, {id, navigate}) {
  const errors = {};
  const controls = {};
  const extra = [];
  let original = null;
  const err = (name) => (errors[name] = h("p", {class: "error", testid: `error-${name}`, id: `error-${name}`, role: "alert"}));
  const control = (name, el) => {
    el.id = el.id || `form-${name}`;
    el.setAttribute("data-testid", `form-${name}`);
    el.setAttribute("aria-describedby", `error-${name}`);
    el.addEventListener("input", preview);
    el.addEventListener("change", preview);
    controls[name] = el;
    return el;
  };
  const labelled = (name, text, el, ...more) => h("div", {class: "field"},
    h("label", {for: `form-${name}`}, text), control(name, el), ...more, err(name));

  const type = h("select", {}, h("option", {value: "server"}, "server"), h("option", {value: "client"}, "client"));
  const tls = h("select", {},
    h("option", {value: ""}, "default (server 0; client: learn)"),
    h("option", {value: "0"}, "0: plain"), h("option", {value: "1"}, "1: self-signed, pinned"),
    h("option", {value: "2"}, "2: verified certificate"));
  const key = h("input", {type: "text", autocomplete: "off", spellcheck: "false", class: "mono"});
  const generate = h("button", {type: "button", testid: "generate-key", onclick: () => {
    key.value = strongKey();
    preview();
  }}, "Strong key");
  const params = Object.entries(PARAMS).map(([name, hint]) => h("div", {class: "field"},
    h("label", {for: `form-param-${name}`}, name, " ", h("span", {class: "hint"}, hint)),
    control(`param-${name}`, h("input", {type: "text", spellcheck: "false"})), err(`param-${name}`)));
  const advanced = h("details", {testid: "form-advanced", id: "form-advanced"},
    h("summary", {}, "Advanced NodePass parameters"), h("div", {class: "params"}, ...params));
  const urlPreview = h("code", {testid: "form-url-preview", id: "form-url-preview", class: "preview"});
  const formError = h("p", {class: "error", testid: "form-error", id: "form-error", role: "alert"});
  const submit = h("button", {type: "submit", class: "primary", testid: "form-submit"}, id ? "Save and restart" : "Create");
  const form = h("form", {class: "form", novalidate: true, "aria-label": id ? "Edit instance" : "New instance"},
    h("div", {class: "row2"}, labelled("type", "Type", type), labelled("alias", "Alias", h("input", {type: "text", maxlength: 256}))),
    h("div", {class: "field"}, h("label", {for: "form-key"}, "Tunnel key ",
      h("span", {class: "hint"}, "(server: empty generates one; client: the server's key)")),
    h("div", {class: "inline"}, control("key", key), generate), err("key")),
    h("div", {class: "row2"},
      labelled("tunnel", "Tunnel address", h("input", {type: "text", placeholder: "0.0.0.0:10101", spellcheck: "false"})),
      labelled("target", "Target", h("input", {type: "text", placeholder: "HOST:PORT or HOST:PORT,HOST:PORT", spellcheck: "false"}))),
    h("div", {class: "row2"}, labelled("tls", "TLS", tls),
      labelled("crt", "Certificate file (tls 2)", h("input", {type: "text", placeholder: "/path/cert.pem", spellcheck: "false"}))),
    h("div", {class: "row2"}, labelled("keyfile", "Private key file (tls 2)",
      h("input", {type: "text", placeholder: "/path/key.pem", spellcheck: "false"}))),
    advanced,
    h("div", {class: "field"}, h("span", {class: "hint", id: "url-label"}, "URL"), urlPreview),
    formError, h("div", {}, submit));
  urlPreview.setAttribute("aria-labelledby", "url-label");
  form.addEventListener("submit", (event) => { event.preventDefault(); save(); });
  main.append(h("h1", {}, id ? `Edit instance ${id}` : "New instance"), form);

  function fields() {
    const p = {};
    for (const name of Object.keys(PARAMS)) p[name] = controls[`param-${name}`].value.trim();
    return {type: type.value, key: key.value.trim(), tunnel: controls.tunnel.value.trim(),
      target: controls.target.value.trim(), tls: tls.value, crt: controls.crt.value.trim(),
      keyfile: controls.keyfile.value.trim(), params: p, extra};
  }
  function preview() { setText(urlPreview, buildUrl(fields())); }
  function clearErrors() {
    for (const el of Object.values(errors)) el.textContent = "";
    formError.textContent = "";
    for (const el of Object.values(controls)) el.removeAttribute("aria-invalid");
  }
  function showError(message) {
    const name = fieldOf(message);
    if (name && errors[name]) {
      errors[name].textContent = message;
      controls[name].setAttribute("aria-invalid", "true");
      if (name.startsWith("param-")) advanced.open = true;
      controls[name].focus();
    } else {
      formError.textContent = message;
    }
  }

  async function save() {
    clearErrors();
    const url = buildUrl(fields());
    const alias = controls.alias.value;
    submit.disabled = true;
    try {
      let result;
      if (!id) {
        result = await api("POST", "instances", {alias, url});
      } else {
        // The stored URL may be spelled differently (query order, escapes):
        // only a URL that changes what it means is sent, and the master's
        // 409 (the same instance, spelled another way) is no failure.
        if (url !== original.url && url !== buildUrl(fieldsFromUrl(original.url))) {
          try {
            result = await api("PUT", `instances/${id}`, {url});
          } catch (e) {
            if (!(e instanceof ApiError && e.status === 409)) throw e;
          }
        }
        if (alias !== original.alias) result = await api("PATCH", `instances/${id}`, {alias});
      }
      navigate(`#/i/${(result && result.id) || id}`);
    } catch (e) {
      if (e instanceof ApiError) showError(e.message); else showError(String(e));
    } finally {
      submit.disabled = false;
    }
  }

  async function load() {
    try {
      original = await api("GET", `instances/${id}`);
    } catch (e) {
      formError.textContent = `Cannot load instance ${id}: ${e.message}`;
      submit.disabled = true;
      return;
    }
    const f = fieldsFromUrl(original.url);
    type.value = f.type;
    controls.alias.value = original.alias || "";
    key.value = f.key;
    controls.tunnel.value = f.tunnel;
    controls.target.value = f.target;
    tls.value = f.tls;
    controls.crt.value = f.crt;
    controls.keyfile.value = f.keyfile;
    for (const [k, v] of Object.entries(f.params)) controls[`param-${k}`].value = v;
    if (Object.keys(f.params).length) advanced.open = true;
    extra.push(...f.extra);
    preview();
  }
  if (id) load(); else preview();
  return null;
}
