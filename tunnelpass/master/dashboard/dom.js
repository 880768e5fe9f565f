// DOM helpers: every value from the API goes in as text (textContent or an
// attribute), never as HTML.

/** An element: h("button", {type: "button", "data-testid": "x", onclick: f}, "text", child...) */
export function h(tag, attrs = {}, ...children) {
  const el = tag === "svg" || attrs.svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false || name === "svg") continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "testid") el.setAttribute("data-testid", value);
    else if (name === "class") el.setAttribute("class", value);
    else if (name === "checked" || name === "value" || name === "disabled" || name === "selected") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** An SVG element (namespaced). */
export function s(tag, attrs = {}, ...children) {
  return h(tag, {...attrs, svg: true}, ...children);
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** Set text only when it changed (keeps selection and screen readers calm). */
export function setText(el, text) {
  const value = String(text);
  if (el.textContent !== value) el.textContent = value;
}

/** A labelled field: <div class="field"><label for=id>text</label>{control}</div> */
export function field(labelText, control, ...extra) {
  return h("div", {class: "field"}, h("label", {for: control.id}, labelText), control, ...extra);
}

let dialogBusy = null;

/** The confirmation dialog -> Promise<boolean> (Esc and Cancel: false). */
export function confirmDialog(message, yesText = "Confirm") {
  const dialog = document.getElementById("confirm-dialog");
  const yes = document.getElementById("confirm-yes");
  const no = document.getElementById("confirm-no");
  if (dialogBusy) dialogBusy(false);
  document.getElementById("confirm-text").textContent = message;
  yes.textContent = yesText;
  const opener = document.activeElement;
  return new Promise((resolve) => {
    const done = (answer) => {
      dialogBusy = null;
      yes.removeEventListener("click", onYes);
      no.removeEventListener("click", onNo);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      if (opener && opener.isConnected && opener.focus) opener.focus();
      resolve(answer);
    };
    const onYes = () => done(true);
    const onNo = () => done(false);
    const onCancel = (event) => { event.preventDefault(); done(false); };
    dialogBusy = done;
    yes.addEventListener("click", onYes);
    no.addEventListener("click", onNo);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    no.focus();
  });
}

let toastTimer = null;

/** A short message at the bottom of the screen (bad: an error). */
export function toast(message, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.toggle("bad", bad);
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3500);
}

/** Copy text with navigator.clipboard, saying whether it worked. */
export async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    toast(`${what} copied`);
  } catch (err) {
    toast(`Cannot copy ${what.toLowerCase()}: select it and copy by hand`, true);
  }
}
