// The instances page: the table, live from the store, with sort and filters.

import {clear, h, setText} from "./dom.js";
import {bytes, flow, maskUrl, ping, rate, totals} from "./format.js";
import {store, subscribe} from "./store.js";
import {actionControls} from "./actions.js";

const view = {sort: "alias", descending: false, status: "all", tag: ""};   // kept across visits

const COLUMNS = [
  ["alias", "Alias"], ["type", "Type"], ["flow", "Flow"], ["status", "Status"], ["url", "URL"],
  ["tcps", "TCP"], ["udps", "UDP"], ["pool", "Pool"], ["ping", "Ping"], ["rx", "Received"],
  ["tx", "Sent"], ["rate", "Rate"], ["actions", "Actions"],
];
const SORTABLE = {alias: "Alias", status: "Status", rx: "Received"};

function sortKey(inst, key) {
  if (key === "rx") return totals(inst).rx;
  if (key === "status") return inst.status || "";
  return (inst.alias || inst.id).toLowerCase();
}

function matches(inst) {
  if (view.status !== "all" && inst.status !== view.status) return false;
  const tag = view.tag.trim().toLowerCase();
  if (!tag) return true;
  const tags = (inst.meta && inst.meta.tags) || {};
  return Object.entries(tags).some(([k, v]) => k.toLowerCase().includes(tag) || String(v).toLowerCase().includes(tag)
    || `${k}=${v}`.toLowerCase() === tag);
}

function makeRow(id, navigate) {
  const get = () => store.instances.get(id) || {id};
  const cells = {};
  const cell = (name, extraClass = "") => {
    cells[name] = h("td", {testid: `cell-${name}`, "data-label": COLUMNS.find((c) => c[0] === name)[1],
      class: extraClass || null});
    return cells[name];
  };
  const alias = h("button", {type: "button", class: "alias-link", onclick: () => navigate(`#/i/${id}`)});
  const status = h("span", {class: "status"});
  const controls = actionControls(get);
  const tr = h("tr", {testid: "instance-row", "data-id": id},
    cell("alias"), cell("type"), cell("flow"), cell("status"), cell("url", "url"), cell("tcps", "num"),
    cell("udps", "num"), cell("pool", "num"), cell("ping", "num"), cell("rx", "num"), cell("tx", "num"),
    cell("rate", "num"), h("td", {"data-label": "Actions"}, controls.el));
  cells.alias.append(alias);
  cells.alias.addEventListener("click", (event) => { if (event.target === cells.alias) alias.click(); });
  cells.status.append(status);
  const update = () => {
    const inst = get();
    const t = totals(inst);
    const r = store.rates.get(id) || {rx: 0, tx: 0};
    setText(alias, inst.alias || inst.id);
    alias.setAttribute("aria-label", `Open ${inst.alias || inst.id}`);
    setText(cells.type, inst.type || "");
    setText(cells.flow, flow(inst));
    setText(status, inst.status || "");
    status.className = `status ${inst.status || ""}`;
    setText(cells.url, maskUrl(inst.url));
    setText(cells.tcps, inst.tcps ?? 0);
    setText(cells.udps, inst.udps ?? 0);
    setText(cells.pool, inst.pool ?? 0);
    setText(cells.ping, ping(inst.ping));
    setText(cells.rx, bytes(t.rx));
    setText(cells.tx, bytes(t.tx));
    setText(cells.rate, rate(r.rx + r.tx));
    cells.rate.title = `received ${rate(r.rx)}, sent ${rate(r.tx)}`;
    controls.update(inst);
  };
  update();
  return {tr, update};
}

export function instancesPage(main, {navigate}) {
  const rows = new Map();
  const statusSelect = h("select", {id: "filter-status", testid: "filter-status",
    onchange: () => { view.status = statusSelect.value; render(null); }},
  ...["all", "running", "stopped", "error"].map((v) => h("option", {value: v, selected: v === view.status}, v)));
  const tagInput = h("input", {id: "filter-tag", testid: "filter-tag", type: "search", value: view.tag,
    placeholder: "key or value", oninput: () => { view.tag = tagInput.value; render(null); }});
  const sortButton = (key) => {
    const b = h("button", {type: "button", testid: `sort-${key}`, onclick: () => {
      if (view.sort === key) view.descending = !view.descending;
      else { view.sort = key; view.descending = key === "rx"; }
      render(null);
    }}, SORTABLE[key]);
    return b;
  };
  const sorters = Object.fromEntries(Object.keys(SORTABLE).map((k) => [k, sortButton(k)]));
  const headCells = COLUMNS.map(([name, text]) => {
    const th = h("th", {scope: "col"}, sorters[name] || text);
    if (sorters[name]) th.dataset.sort = name;
    return th;
  });
  const tbody = h("tbody");
  const empty = h("p", {class: "empty", hidden: true});
  const count = h("span", {class: "muted"});
  const table = h("table", {testid: "instances-table", "aria-label": "Instances"},
    h("thead", {}, h("tr", {class: "labels"}, ...headCells)),
    tbody);
  main.append(
    h("h1", {}, "Instances ", count),
    h("div", {class: "filters", role: "search"},
      h("div", {}, h("label", {for: "filter-status"}, "Status"), statusSelect),
      h("div", {}, h("label", {for: "filter-tag"}, "Tag"), tagInput),
      h("a", {href: "#/new"}, "+ New instance")),
    h("div", {class: "table-wrap"}, table), empty);

  function render(ids) {
    for (const id of [...rows.keys()]) {
      if (!store.instances.has(id)) { rows.get(id).tr.remove(); rows.delete(id); }
    }
    const shown = [...store.instances.values()].filter(matches);
    shown.sort((a, b) => {
      const x = sortKey(a, view.sort), y = sortKey(b, view.sort);
      const order = x < y ? -1 : x > y ? 1 : a.id.localeCompare(b.id);
      return view.descending ? -order : order;
    });
    for (const inst of shown) {
      let row = rows.get(inst.id);
      if (!row) { row = makeRow(inst.id, navigate); rows.set(inst.id, row); }
      else if (!ids || ids.has(inst.id) || ids.has(null)) row.update();
    }
    const wanted = shown.map((inst) => rows.get(inst.id).tr);
    const current = [...tbody.children];
    if (wanted.length !== current.length || wanted.some((tr, i) => tr !== current[i])) {
      const hiddenRows = [...rows.values()].map((r) => r.tr).filter((tr) => !wanted.includes(tr));
      for (const tr of hiddenRows) tr.remove();
      wanted.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    }
    for (const th of headCells) {
      const key = th.dataset.sort;
      if (key) th.setAttribute("aria-sort", key === view.sort ? (view.descending ? "descending" : "ascending") : "none");
    }
    setText(count, `(${shown.length} of ${store.instances.size})`);
    empty.hidden = shown.length > 0;
    setText(empty, store.instances.size ? "No instance matches the filters." : "No instances yet: create one with New instance.");
  }
  render(null);
  const unsubscribe = subscribe(render);
  return () => { unsubscribe(); clear(main); };
}
