// The demo page: builds a form from GET /info, posts it to /predict as multipart, shows each task's answer
// and, when asked, the explanation picture from POST /explain.
"use strict";

const TOP = 5;  // classes shown per task
let INFO = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function inputField(modality, spec) {
  const key = spec.fields[0];
  const id = `input-${key}`;
  const label = el("label", { for: id, text: `${modality}${spec.required ? "" : " (optional)"}` });
  let control;
  if (spec.upload) {
    control = el("input", { id, name: key, type: "file" });
    if (spec.modality === "image") control.setAttribute("accept", "image/*");
    const preview = el("img", { class: "preview", alt: "", hidden: "" });
    control.addEventListener("change", () => {
      const file = control.files[0];
      if (file && file.type.startsWith("image/")) {
        preview.src = URL.createObjectURL(file);
        preview.hidden = false;
      } else preview.hidden = true;
    });
    return el("div", { class: "field" }, label, control, preview);
  }
  const placeholder = spec.modality === "text" ? "type a text, e.g. a question" : `the ${key} value`;
  control = el("input", { id, name: key, type: "text", placeholder });
  return el("div", { class: "field" }, label, control);
}

function bars(probabilities) {
  const sorted = Object.entries(probabilities).sort((a, b) => b[1] - a[1]).slice(0, TOP);
  return sorted.map(([name, p]) => el("div", { class: "bar" },
    el("span", { class: "name", text: name }),
    el("span", { class: "track" }, el("span", { class: "fill", style: `width:${(100 * p).toFixed(1)}%;display:block` })),
    el("span", { class: "value", text: `${(100 * p).toFixed(1)}%` })));
}

function answerText(result) {
  if ("label" in result) return String(result.label);
  if ("labels" in result) return result.labels.length ? result.labels.join(", ") : "(none)";
  if ("value" in result) return Number(result.value).toFixed(4);
  return JSON.stringify(result);
}

function showResults(results) {
  const box = document.getElementById("results");
  box.replaceChildren();
  for (const [task, result] of Object.entries(results)) {
    const kind = INFO.tasks[task] ? INFO.tasks[task].kind : "";
    const card = el("div", { class: "task", "data-task": task },
      el("h2", { text: `${task}${kind ? ` (${kind})` : ""}` }),
      el("div", { class: "answer", text: answerText(result) }));
    if (result.probabilities) card.append(...bars(result.probabilities));
    box.append(card);
  }
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

function showMetrics(metrics) {
  const split = metrics && (metrics.test || metrics.val);
  if (!split) return;
  const table = document.getElementById("metrics");
  table.append(el("tr", {}, el("th", { text: "task" }), el("th", { text: "metric" }), el("th", { text: "value" })));
  for (const [task, values] of Object.entries(split)) {
    for (const [name, value] of Object.entries(values)) {
      table.append(el("tr", {}, el("td", { text: task }), el("td", { text: name }),
        el("td", { text: Number(value).toFixed(4) })));
    }
  }
  document.getElementById("metrics-box").hidden = false;
}

async function explain(data) {
  const box = document.getElementById("explanation");
  const img = document.getElementById("explanation-img");
  box.hidden = false;
  img.hidden = true;
  document.getElementById("explain-busy").hidden = false;
  try {
    const response = await fetch("/explain", { method: "POST", body: data });
    const body = await response.json();
    if (!response.ok) { showError(body.error || `error ${response.status}`); box.hidden = true; return; }
    img.src = body.image;
    img.hidden = false;
  } finally {
    document.getElementById("explain-busy").hidden = true;
  }
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const data = new FormData();
  for (const control of form.querySelectorAll("input[name]")) {
    if (control.type === "file") { if (control.files.length) data.append(control.name, control.files[0]); }
    else if (control.value.trim()) data.append(control.name, control.value);
  }
  showError("");
  document.getElementById("explanation").hidden = true;
  document.getElementById("busy").hidden = false;
  document.getElementById("submit").disabled = true;
  try {
    const response = await fetch("/predict", { method: "POST", body: data });
    const body = await response.json();
    if (!response.ok) { showError(body.error || `error ${response.status}`); return; }
    showResults(body);
    if (document.getElementById("explain").checked) await explain(data);
  } catch (err) {
    showError(`the server did not answer (${err})`);
  } finally {
    document.getElementById("busy").hidden = true;
    document.getElementById("submit").disabled = false;
  }
}

async function main() {
  try {
    INFO = await (await fetch("/info")).json();
  } catch (err) {
    document.getElementById("summary").textContent = `cannot read /info (${err})`;
    return;
  }
  document.getElementById("run-name").textContent = INFO.name;
  const tasks = Object.entries(INFO.tasks).map(([name, t]) => `${name} (${t.kind})`).join(", ");
  document.getElementById("summary").textContent = `Predicts ${tasks}.`;
  const inputs = document.getElementById("inputs");
  for (const [modality, spec] of Object.entries(INFO.inputs)) inputs.append(inputField(modality, spec));
  showMetrics(INFO.metrics);
  const form = document.getElementById("predict-form");
  form.addEventListener("submit", submit);
  document.getElementById("submit").disabled = false;
}

main();
