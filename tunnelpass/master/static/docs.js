// Renders the served openapi.json as a reference page: operations with
// their parameters, bodies and responses, then the schemas.  Text only
// goes through textContent, never markup, so nothing in the document can
// inject script.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function refName(schema) {
  if (schema && schema.$ref) return schema.$ref.split("/").pop();
  return null;
}

function describe(schema) {
  if (!schema) return "";
  const ref = refName(schema);
  if (ref) return ref;
  if (schema.oneOf) return schema.oneOf.map(describe).join(" | ");
  let text = Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "any");
  if (schema.type === "array" && schema.items) text = "array of " + describe(schema.items);
  const limits = [];
  if (schema.enum) limits.push("one of " + schema.enum.join(", "));
  if (schema.minLength !== undefined) limits.push("min " + schema.minLength);
  if (schema.maxLength !== undefined) limits.push("max " + schema.maxLength + " chars");
  if (schema.pattern) limits.push("pattern " + schema.pattern);
  if (schema.format) limits.push(schema.format);
  if (schema.additionalProperties === false) limits.push("no other fields");
  return limits.length ? text + " (" + limits.join("; ") + ")" : text;
}

function table(headings, rows) {
  const t = el("table");
  const head = el("tr");
  headings.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach((cells) => {
    const tr = el("tr");
    cells.forEach((c) => tr.appendChild(el("td", c)));
    t.appendChild(tr);
  });
  return t;
}

function operation(doc, path, method, op, shared) {
  const box = el("div", null, "op");
  box.id = op.operationId;
  const title = el("div");
  title.appendChild(el("span", method, "method " + method));
  title.appendChild(el("span", doc.servers[0].url + path, "path"));
  if (op.security && op.security.length === 0) title.appendChild(el("span", "no key needed", "public"));
  box.appendChild(title);
  box.appendChild(el("p", op.summary || ""));
  box.appendChild(el("p", "operationId: " + op.operationId, "muted"));
  const params = (shared || []).concat(op.parameters || []);
  if (params.length) {
    box.appendChild(el("h4", "Parameters"));
    box.appendChild(table(["name", "in", "required", "schema"],
      params.map((p) => [p.name, p.in, p.required ? "yes" : "no", describe(p.schema)])));
  }
  if (op.requestBody) {
    box.appendChild(el("h4", "Body"));
    const content = op.requestBody.content || {};
    Object.keys(content).forEach((type) => box.appendChild(el("p", type + ": " + describe(content[type].schema))));
  }
  box.appendChild(el("h4", "Responses"));
  box.appendChild(table(["status", "description", "body"],
    Object.keys(op.responses).map((code) => {
      const r = op.responses[code];
      const content = r.content || {};
      const bodies = Object.keys(content).map((t) => t + ": " + describe(content[t].schema));
      return [code, r.description || "", bodies.join(", ")];
    })));
  return box;
}

function schemaSection(name, schema) {
  const box = el("div", null, "op");
  box.id = "schema-" + name;
  box.appendChild(el("h3", name));
  if (schema.description) box.appendChild(el("p", schema.description));
  const props = schema.properties || {};
  const required = schema.required || [];
  box.appendChild(table(["field", "type", "required"],
    Object.keys(props).map((p) => [p, describe(props[p]), required.indexOf(p) >= 0 ? "yes" : ""])));
  return box;
}

function render(doc) {
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  const scheme = (doc.components.securitySchemes || {}).ApiKey;
  document.getElementById("summary").textContent = (doc.info.description || "") +
    (scheme ? " Send the API key in the " + scheme.name + " header." : "");
  const ops = document.getElementById("operations");
  const toc = document.getElementById("toc");
  ops.appendChild(el("h2", "Operations"));
  const methods = ["get", "post", "put", "patch", "delete"];
  Object.keys(doc.paths).forEach((path) => {
    const item = doc.paths[path];
    methods.forEach((m) => {
      if (!item[m]) return;
      ops.appendChild(operation(doc, path, m, item[m], item.parameters));
      const link = el("a", item[m].operationId);
      link.href = "#" + item[m].operationId;
      toc.appendChild(link);
    });
  });
  const schemas = document.getElementById("schemas");
  schemas.appendChild(el("h2", "Schemas"));
  Object.keys(doc.components.schemas).forEach((name) => schemas.appendChild(schemaSection(name, doc.components.schemas[name])));
}

document.addEventListener("DOMContentLoaded", () => {
  fetch("openapi.json")
    .then((r) => { if (!r.ok) throw new Error("openapi.json: HTTP " + r.status); return r.json(); })
    .then(render)
    .catch((e) => { document.getElementById("summary").textContent = String(e); });
});
