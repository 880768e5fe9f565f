// The instance actions shared by a table row and the detail page: start,
// stop, restart, reset (confirmed), delete (confirmed), auto-restart.

import {api} from "./api.js";
import {confirmDialog, h, toast} from "./dom.js";
import {putInstance} from "./store.js";

function label(inst) {
  return inst.alias ? `"${inst.alias}" (${inst.id})` : inst.id;
}

/** Run one PATCH action on *inst* (reset asks first). */
export async function runAction(inst, action) {
  if (action === "reset" && !await confirmDialog(`Reset the traffic counters of ${label(inst)}?`, "Reset")) return;
  try {
    putInstance(await api("PATCH", `instances/${inst.id}`, {action}));
    toast(`${action}: ${label(inst)}`);
  } catch (err) {
    toast(`${action} failed: ${err.message}`, true);
  }
}

/** Delete *inst* after confirmation -> true when deleted. */
export async function deleteInstance(inst) {
  if (!await confirmDialog(`Delete ${label(inst)}? It is stopped and its configuration is removed.`, "Delete")) {
    return false;
  }
  try {
    await api("DELETE", `instances/${inst.id}`);
    toast(`deleted: ${label(inst)}`);
    return true;
  } catch (err) {
    toast(`delete failed: ${err.message}`, true);
    return false;
  }
}

async function setRestart(inst, box) {
  box.disabled = true;
  try {
    putInstance(await api("PATCH", `instances/${inst.id}`, {restart: box.checked}));
  } catch (err) {
    box.checked = !box.checked;
    toast(`auto-restart not changed: ${err.message}`, true);
  } finally {
    box.disabled = false;
  }
}

/** The action controls for one instance; get() returns its current view.
 *  -> {el, update(inst)} */
export function actionControls(get, {onDeleted = () => {}, extra = []} = {}) {
  const button = (action, text) => h("button", {
    type: "button", class: `small${action === "delete" ? " danger" : ""}`, testid: `action-${action}`,
    "aria-label": `${text} ${get().alias || get().id}`,
    onclick: () => (action === "delete" ? deleteInstance(get()).then((gone) => gone && onDeleted())
      : runAction(get(), action)),
  }, text);
  const buttons = {
    start: button("start", "Start"), stop: button("stop", "Stop"), restart: button("restart", "Restart"),
    reset: button("reset", "Reset"), delete: button("delete", "Delete"),
  };
  const boxId = `restart-${get().id}-${Math.random().toString(36).slice(2, 8)}`;
  const box = h("input", {type: "checkbox", id: boxId, testid: "toggle-restart",
    onchange: () => setRestart(get(), box)});
  const toggle = h("span", {class: "actions"}, box, h("label", {for: boxId, class: "hint"}, "auto-restart"));
  const el = h("div", {class: "actions"}, ...Object.values(buttons), ...extra, toggle);
  const update = (inst) => {
    // Never disabled (a start of a running instance is harmless); the
    // current state is marked for the eye and for screen readers.
    buttons.start.classList.toggle("current", inst.status === "running");
    buttons.stop.classList.toggle("current", inst.status === "stopped");
    if (!box.disabled) box.checked = !!inst.restart;
  };
  update(get());
  return {el, update};
}
