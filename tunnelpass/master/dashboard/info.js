// The master's page: version, uptime, CPU, memory, network; rotate the API key.

import {api} from "./api.js";
import {confirmDialog, h, setText, toast} from "./dom.js";
import {bytes, duration} from "./format.js";

export function infoPage(main, {signOut}) {
  const value = (testid) => h("dd", {testid});
  const fields = {
    alias: value("info-alias"), version: value("info-version"), uptime: value("info-uptime"),
    host: value("info-host"), cpu: value("info-cpu"), memory: value("info-memory"),
    swap: value("info-swap"), network: value("info-network"), disk: value("info-disk"),
    tls: value("info-tls"), log: value("info-log"), id: value("info-id"),
  };
  const labels = {alias: "Alias", version: "Version", uptime: "Uptime", host: "Host", cpu: "CPU",
    memory: "Memory", swap: "Swap", network: "Network (total rx / tx)", disk: "Disk (read / written)",
    tls: "API TLS", log: "Log level", id: "Master id"};
  const error = h("p", {class: "error", role: "alert"});
  const rotate = h("button", {type: "button", class: "danger", testid: "rotate-key", onclick: rotateKey}, "Rotate API key");
  main.append(h("h1", {}, "Master"), error,
    h("dl", {class: "info panel"}, ...Object.entries(fields).flatMap(([k, dd]) => [h("dt", {}, labels[k]), dd])),
    h("h2", {}, "API key"),
    h("p", {}, "Rotating makes a new API key and the current one stops working at once: every dashboard and ",
      "script using it is signed out. The new key is shown once."),
    rotate);

  async function load() {
    let info;
    try {
      info = await api("GET", "info");
    } catch (e) {
      setText(error, `Cannot read the master's information: ${e.message}`);
      return;
    }
    setText(error, "");
    setText(fields.alias, info.alias || "\u2014");
    setText(fields.version, info.ver || "");
    setText(fields.uptime, duration(info.uptime));
    setText(fields.host, `${info.name || ""} (${info.os || ""}/${info.arch || ""}), up ${duration(info.sysup)}`);
    setText(fields.cpu, typeof info.cpu === "number" && info.cpu >= 0 ? `${info.cpu}%` : "\u2014");
    setText(fields.memory, `${bytes(info.mem_used)} of ${bytes(info.mem_total)}`);
    setText(fields.swap, `${bytes(info.swap_used)} of ${bytes(info.swap_total)}`);
    setText(fields.network, `${bytes(info.netrx)} / ${bytes(info.nettx)}`);
    setText(fields.disk, `${bytes(info.diskr)} / ${bytes(info.diskw)}`);
    setText(fields.tls, String(info.tls ?? ""));
    setText(fields.log, info.log || "");
    setText(fields.id, info.mid || "");
  }

  async function rotateKey() {
    if (!await confirmDialog("Rotate the API key? The current key stops working now; you sign in again with the new one.",
      "Rotate")) return;
    rotate.disabled = true;
    try {
      const entry = await api("PATCH", "instances/********", {action: "restart"});
      signOut("The API key was rotated: sign in with the new key.", entry.url);
    } catch (e) {
      toast(`Key not rotated: ${e.message}`, true);
      rotate.disabled = false;
    }
  }

  load();
  const timer = setInterval(load, 5000);
  return () => clearInterval(timer);
}
