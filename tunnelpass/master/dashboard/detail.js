// One instance: live status, counts, chart, log tail, client command and
// token, alias and tags, actions.

import {api} from "./api.js";
import {copyText, h, setText, toast} from "./dom.js";
import {LEVELS, bytes, flow, formatTags, maskUrl, parseTags, ping, rate, totals} from "./format.js";
import {putInstance, store, subscribe, subscribeLogs} from "./store.js";
import {actionControls} from "./actions.js";
import {drawChart, makeChart} from "./chart.js";

const now = () => Date.now() / 1000 + store.skew;

function card(testid, label) {
  const value = h("span", {class: "value", testid});
  return {value, el: h("div", {class: "card"}, h("span", {class: "label"}, label), value)};
}

export function detailPage(main, {id, navigate}) {
  const get = () => store.instances.get(id) || {id};
  const title = h("h1", {});
  const status = h("span", {class: "status", testid: "detail-status"});
  const controls = actionControls(get, {
    onDeleted: () => navigate("#/instances"),
    extra: [h("a", {href: `#/edit/${id}`, testid: "action-edit", class: "small"}, "Edit")],
  });
  const cards = {};
  for (const [key, label] of [["tcps", "TCP connections"], ["udps", "UDP sessions"], ["pool", "Pool"],
    ["ping", "Ping"], ["rx", "Received"], ["tx", "Sent"], ["rate", "Rate (rx / tx)"]]) {
    cards[key] = card(`detail-${key}`, label);
  }
  const meta = h("p", {class: "muted"});
  const chart = makeChart();

  // alias and tags
  const aliasInput = h("input", {id: "edit-alias", testid: "edit-alias", type: "text", maxlength: 256});
  const tagsInput = h("input", {id: "edit-tags", testid: "edit-tags", type: "text", placeholder: "k=v, k2=v2"});
  const saveAlias = h("button", {type: "button", testid: "save-alias", onclick: () => patch({alias: aliasInput.value}, "alias")}, "Save alias");
  const saveTags = h("button", {type: "button", testid: "save-tags", onclick: () => {
    let tags;
    try { tags = parseTags(tagsInput.value); } catch (e) { toast(e.message, true); tagsInput.focus(); return; }
    if (tagsInput.value === tagsInput.dataset.shown) { toast("tags unchanged"); return; }
    patch({meta: {tags}}, "tags");
  }}, "Save tags");

  // client end
  const clientBox = h("section", {class: "client", hidden: true, "aria-labelledby": "client-title"});
  const command = h("pre", {testid: "client-command", id: "client-command"});
  const token = h("pre", {testid: "client-token", id: "client-token"});
  const tokenRow = h("div", {}, h("span", {class: "hint", id: "token-label"}, "Token"), token,
    h("button", {type: "button", testid: "copy-token", class: "small",
      onclick: () => copyText(token.textContent, "Token")}, "Copy token"));
  clientBox.append(h("h2", {id: "client-title"}, "Client end"),
    h("p", {class: "hint"}, "Run this on the client's machine; replace HOST:PORT with what it should serve or dial."),
    h("span", {class: "hint", id: "command-label"}, "Command"), command,
    h("button", {type: "button", testid: "copy-command", class: "small",
      onclick: () => copyText(command.textContent, "Command")}, "Copy command"),
    tokenRow);
  command.setAttribute("aria-labelledby", "command-label");
  token.setAttribute("aria-labelledby", "token-label");

  // logs
  let level = "all";
  const levelSelect = h("select", {id: "log-level", testid: "log-level", onchange: () => {
    level = levelSelect.value;
    renderLogs();
  }}, h("option", {value: "all"}, "all"), ...LEVELS.map((l) => h("option", {value: l}, `${l} and above`)));
  const tail = h("div", {class: "log-tail", testid: "log-tail", role: "log", "aria-live": "off", tabindex: "0",
    "aria-label": "Log lines"});
  const shows = (entry) => level === "all" || LEVELS.indexOf(entry.level) >= LEVELS.indexOf(level);
  const lineEl = (entry) => h("div", {class: "log-line", testid: "log-line", "data-level": entry.level}, entry.text);
  function renderLogs() {
    tail.replaceChildren(...(store.logs.get(id) || []).filter(shows).map(lineEl));
    tail.scrollTop = tail.scrollHeight;
  }

  main.append(
    h("div", {class: "detail", testid: "detail", "data-id": id},
      h("p", {}, h("a", {href: "#/instances"}, "\u2190 Instances")),
      h("div", {class: "detail-head"}, title, status), meta, controls.el,
      h("h2", {}, "Now"), h("div", {class: "cards"}, ...Object.values(cards).map((c) => c.el)),
      h("h2", {}, "Throughput"),
      h("div", {class: "chart-box"}, chart,
        h("div", {class: "legend"}, h("span", {class: "rx"}, "received"), h("span", {class: "tx"}, "sent"))),
      clientBox,
      h("h2", {}, "Alias and tags"),
      h("div", {class: "edit-grid"},
        h("div", {class: "field"}, h("label", {for: "edit-alias"}, "Alias"), h("div", {class: "inline"}, aliasInput, saveAlias)),
        h("div", {class: "field"}, h("label", {for: "edit-tags"}, "Tags"), h("div", {class: "inline"}, tagsInput, saveTags))),
      h("h2", {}, "Log"),
      h("div", {class: "filters"}, h("div", {}, h("label", {for: "log-level"}, "Level"), levelSelect)),
      tail));

  async function patch(body, what) {
    try {
      const inst = await api("PATCH", `instances/${id}`, body);
      putInstance(inst);
      toast(`${what} saved`);
    } catch (e) {
      toast(`${what} not saved: ${e.message}`, true);
    }
  }

  let filled = false;
  function update() {
    const inst = get();
    if (!store.instances.has(id)) {
      setText(title, `Instance ${id}`);
      setText(status, "not found (deleted?)");
      return;
    }
    const t = totals(inst);
    const r = store.rates.get(id) || {rx: 0, tx: 0};
    setText(title, inst.alias || inst.id);
    setText(status, inst.status);
    status.className = `status ${inst.status}`;
    setText(meta, `${inst.type} \u00b7 flow ${flow(inst)} \u00b7 ${maskUrl(inst.url)}`);
    setText(cards.tcps.value, inst.tcps ?? 0);
    setText(cards.udps.value, inst.udps ?? 0);
    setText(cards.pool.value, inst.pool ?? 0);
    setText(cards.ping.value, ping(inst.ping));
    setText(cards.rx.value, bytes(t.rx));
    setText(cards.tx.value, bytes(t.tx));
    setText(cards.rate.value, `${rate(r.rx)} / ${rate(r.tx)}`);
    controls.update(inst);
    if (!filled) {
      filled = true;
      aliasInput.value = inst.alias || "";
      tagsInput.value = tagsInput.dataset.shown = formatTags(inst.meta && inst.meta.tags);
    }
    drawChart(chart, store.history.get(id) || [], now());
  }

  async function loadFull() {
    try {
      const inst = await api("GET", `instances/${id}`);
      if (inst.client && typeof inst.client.command === "string") {
        command.textContent = inst.client.command;
        token.textContent = inst.client.token || "";
        tokenRow.hidden = !inst.client.token;
        clientBox.hidden = false;
      }
    } catch (e) {
      if (e.status === 404) setText(status, "not found");
    }
  }

  update();
  renderLogs();
  loadFull();
  let retries = 0;
  const unsubscribe = subscribe((ids) => {
    if (ids.has(id) || ids.has(null)) {
      update();
      // A tls=1 server's token needs the certificate its first start saves.
      if (get().status === "running" && get().type === "server" && (clientBox.hidden || tokenRow.hidden)
          && retries < 12) {
        retries += 1;
        loadFull();
      }
    }
  });
  const unsubscribeLogs = subscribeLogs((logId, entry) => {
    if (logId !== id || !shows(entry)) return;
    const stick = tail.scrollTop + tail.clientHeight >= tail.scrollHeight - 4;
    tail.append(lineEl(entry));
    while (tail.childElementCount > 500) tail.firstElementChild.remove();
    if (stick) tail.scrollTop = tail.scrollHeight;
  });
  const timer = setInterval(() => drawChart(chart, store.history.get(id) || [], now()), 5000);
  return () => { unsubscribe(); unsubscribeLogs(); clearInterval(timer); };
}
