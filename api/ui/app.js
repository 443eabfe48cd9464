// The /ui page: a form built from the OpenAPI document's row schema, a CSV file scored as a
// task, and what serves with its drift. Plain JavaScript, no dependency; it calls the /v1 API
// like any other client. No innerHTML: every value the server sends is set as text.
"use strict";

const API = "/v1";
const PAGE_ROWS = 50;
const POLL_MS = 250;
const REASONS = {
  low_confidence: "the model's confidence was below the minimum this use case accepts",
  model_error: "the model failed on this row",
  timeout: "the model did not answer within the deadline",
  model_not_ready: "the model was not loaded yet",
};
const TASK_STAGES = { queued: 50, running: 75, succeeded: 90, failed: 100 };
const state = { fields: [], key: null, classes: [], task: null, results: null, page: 0 };

// ---- small helpers ----------------------------------------------------------------------
function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const pct = (p) => (p === null || p === undefined ? "–" : `${(p * 100).toFixed(2)}%`);
const count = (n) => n.toLocaleString("en-US");
const signed = (x) => (x >= 0 ? "+" : "−") + Math.abs(x).toFixed(3);

async function call(path, options = {}) {
  const init = { ...options, headers: { accept: "application/json", ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers["content-type"] = "application/json";
  }
  const response = await fetch(path, init);
  const body = await response.json().catch(() => null);
  return { ok: response.ok, status: response.status, body };
}

function errorMessage(answer) {
  const error = answer.body && answer.body.error;
  return error ? error.message : `the server answered ${answer.status}`;
}

// ---- the contract: the row schema from /docs.json ----------------------------------------
function resolve(spec, schema) {
  let node = schema;
  while (node && node.$ref) node = spec.components.schemas[node.$ref.split("/").pop()];
  return node;
}

function fieldsOf(spec) {
  const request = spec.paths[`${API}/predict`].post.requestBody.content["application/json"].schema;
  const predict = resolve(spec, request);
  const row = resolve(spec, predict.properties.instance);
  const required = new Set(row.required || []);
  state.topK = predict.properties.top_k || {};
  state.rowDescription = row.description || "";
  return Object.entries(row.properties).map(([name, property]) => {
    const choices = property.anyOf || [property];
    const base = choices.find((c) => c.type !== "null") || {};
    const nullable = choices.some((c) => c.type === "null");
    let type = "text";
    if (base.enum || base.const !== undefined) type = "categorical";
    else if (base.type === "number" || base.type === "integer") type = "numeric";
    else if (base.type === "boolean") type = "boolean";
    return {
      name, type, nullable, required: required.has(name),
      title: property.title || name,
      description: property.description || "",
      min: base.minimum, max: base.maximum, maxLength: base.maxLength,
      categories: base.enum || (base.const !== undefined ? [base.const] : []),
    };
  });
}

// ---- Score one ---------------------------------------------------------------------------
function helpText(field) {
  const parts = [field.description];
  if (field.type === "numeric") parts.push(`${field.min ?? "−∞"} to ${field.max ?? "∞"}.`);
  if (field.type === "text" && field.maxLength) parts.push(`At most ${field.maxLength} characters.`);
  parts.push(field.required ? "Required." : "Optional.");
  return parts.filter(Boolean).join(" ");
}

function buildField(field) {
  const id = `f-${field.name}`;
  const described = `${id}-help ${id}-error`;
  let input;
  if (field.type === "categorical" || field.type === "boolean") {
    input = el("select", { id, name: field.name, "aria-describedby": described });
    input.append(el("option", { value: "", text: field.required ? "choose…" : "unknown" }));
    const values = field.type === "boolean" ? ["true", "false"] : field.categories;
    for (const value of values) {
      const text = field.type === "boolean" ? (value === "true" ? "yes" : "no") : value;
      input.append(el("option", { value, text }));
    }
  } else {
    const numeric = field.type === "numeric";
    input = el("input", {
      id, name: field.name, type: numeric ? "number" : "text", "aria-describedby": described,
      step: numeric ? "any" : null, min: numeric ? field.min : null, max: numeric ? field.max : null,
      inputmode: numeric ? "decimal" : null, maxlength: field.maxLength || null, autocomplete: "off",
    });
  }
  const box = el("div", { class: "field", "data-field": field.name },
    el("label", { for: id, text: field.name }), input);
  if (field.type === "numeric" && field.nullable) {
    const unknown = el("input", { type: "checkbox", id: `${id}-unknown`, "data-unknown": field.name });
    unknown.addEventListener("change", () => { input.disabled = unknown.checked; });
    box.append(el("label", { class: "unknown", for: `${id}-unknown` }, unknown, "unknown"));
  }
  box.append(el("p", { class: "help", id: `${id}-help`, text: helpText(field) }));
  box.append(el("p", { class: "field-error", id: `${id}-error`, role: "alert" }));
  return box;
}

function setField(field, value) {
  const input = $(`f-${field.name}`);
  const unknown = $(`f-${field.name}-unknown`);
  if (unknown) { unknown.checked = value === null; input.disabled = value === null; }
  input.value = value === null || value === undefined ? "" : String(value);
}

function readRow() {
  const row = {};
  for (const field of state.fields) {
    const input = $(`f-${field.name}`);
    const unknown = $(`f-${field.name}-unknown`);
    if (unknown && unknown.checked) { row[field.name] = null; continue; }
    const raw = input.value.trim();
    if (raw === "") {
      if (field.nullable && input.tagName === "SELECT") row[field.name] = null;
      continue;  // left out: the server says whether it is required
    }
    if (field.type === "numeric") row[field.name] = Number(raw);
    else if (field.type === "boolean") row[field.name] = raw === "true";
    else row[field.name] = raw;
  }
  return row;
}

function clearErrors() {
  $("form-error").textContent = "";
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function showErrors(answer) {
  const names = new Set(state.fields.map((f) => f.name));
  const unplaced = [];
  let first = null;
  const details = (answer.body && answer.body.error && answer.body.error.details) || [];
  for (const detail of details) {
    const name = (detail.loc || []).find((part) => names.has(part));
    if (name === undefined) { unplaced.push(detail.msg); continue; }
    const slot = $(`f-${name}-error`);
    slot.textContent = slot.textContent ? `${slot.textContent}; ${detail.msg}` : detail.msg;
    $(`f-${name}`).setAttribute("aria-invalid", "true");
    first = first || $(`f-${name}`);
  }
  $("form-error").textContent = unplaced.length || !details.length
    ? errorMessage(answer) : "The row was refused: see the fields marked above.";
  if (first) first.focus();
}

function describeSource(prediction) {
  if (prediction.source === "model") return `Answered by the model (${prediction.arm}, version ${prediction.model_version}).`;
  const why = REASONS[prediction.fallback_reason] || prediction.fallback_reason || "no reason given";
  return `Answered by the use case's fallback, not the model: ${why}.`;
}

function showAnswer(body) {
  const p = body.prediction;
  $("answer").hidden = false;
  $("label").textContent = p.label === null ? "no decision" : p.label;
  $("label").dataset.value = p.label === null ? "" : p.label;
  $("confidence").textContent = p.confidence === null
    ? "Confidence: none, the model did not answer."
    : `Confidence ${pct(p.confidence)}: the model's probability of the label it decided.`;
  $("source").textContent = describeSource(p);
  const m = body.model;
  $("model-line").textContent = `Model ${m.name} version ${m.version} (${m.flavor}, alias ${m.alias}); this answer from the ${p.arm}, version ${p.model_version}.`;
  const rows = $("probabilities").tBodies[0];
  rows.replaceChildren();
  $("probabilities").hidden = !p.probabilities;
  for (const [name, value] of Object.entries(p.probabilities || {})) {
    const bar = el("span");
    bar.style.width = `${(value * 100).toFixed(1)}%`;
    rows.append(el("tr", { "data-class": name },
      el("th", { scope: "row", text: name }),
      el("td", { class: "num", "data-value": value, text: pct(value) }),
      el("td", { class: "meter", "aria-hidden": "true" }, bar)));
  }
  showExplanation(body.explanation, body.explanation_status);
}

function showExplanation(explanation, status) {
  const chart = $("explanation");
  chart.replaceChildren();
  if (!explanation) {
    $("explanation-text").textContent = status === "timeout"
      ? "The explanation did not finish within its time budget."
      : "No explanation: the model did not answer this row.";
    return;
  }
  const text = $("explanation-text");
  text.replaceChildren(
    `How each feature moved the model's margin for “${explanation.explained_class}” `,
    `(base ${explanation.base_value.toFixed(3)}, margin ${explanation.margin.toFixed(3)}; `,
    `the features not listed add ${signed(explanation.rest)}): `,
    el("span", { class: "legend" }, el("span", { class: "up", text: "towards it" }), ", ",
      el("span", { class: "down", text: "away from it" })), ".");
  const scale = Math.max(...explanation.contributions.map((c) => Math.abs(c.contribution)), 1e-12);
  chart.setAttribute("role", "list");
  chart.setAttribute("aria-label", `Feature contributions towards ${explanation.explained_class}`);
  for (const c of explanation.contributions) {
    const value = c.value === null ? "unknown" : String(c.value);
    const width = (Math.abs(c.contribution) / scale) * 50;
    const bar = el("span", { class: `bar ${c.contribution >= 0 ? "up" : "down"}`, "data-feature": c.feature });
    bar.style.width = `${width}%`;
    bar.style.left = c.contribution >= 0 ? "50%" : `${50 - width}%`;
    const axis = el("span", { class: "axis" });
    axis.style.left = "50%";
    chart.append(
      el("div", { class: "name", role: "listitem" }, el("b", { text: c.feature }), ` = ${value}: ${signed(c.contribution)}`),
      el("div", { class: "track", "aria-hidden": "true" }, axis, bar));
  }
}

async function scoreRow(event) {
  event.preventDefault();
  clearErrors();
  const button = $("score");
  button.disabled = true;
  try {
    const topK = Number($("top-k").value) || 5;
    const answer = await call(`${API}/predict`, { json: { instance: readRow(), explain: true, top_k: topK } });
    if (answer.ok) showAnswer(answer.body);
    else showErrors(answer);
  } catch (error) {
    $("form-error").textContent = `The request failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function buildForm(presets) {
  const fields = $("fields");
  fields.replaceChildren(...state.fields.map(buildField));
  const top = $("top-k");
  if (state.topK.maximum) top.max = state.topK.maximum;
  const box = $("presets");
  box.replaceChildren(el("span", { text: "Examples:" }));
  presets.examples.forEach((example, i) => {
    const name = presets.key && example[presets.key] ? `: ${example[presets.key]}` : "";
    const button = el("button", { type: "button", class: "secondary", "data-preset": i, text: `Example ${i + 1}${name}` });
    button.addEventListener("click", () => {
      clearErrors();
      for (const field of state.fields) setField(field, example[field.name]);
    });
    box.append(button);
  });
  box.hidden = presets.examples.length === 0;
  $("score-local").hidden = !presets.browser_scoring;  // onnxruntime-web not fetched at setup
  $("row-form").addEventListener("submit", scoreRow);
  $("clear").addEventListener("click", () => {
    clearErrors();
    for (const field of state.fields) setField(field, undefined);
  });
}

// ---- Score in this browser: the served model's ONNX graph in onnxruntime-web -------------
// onnxruntime-web 1.31.1 from the npm registry: dist/ort.wasm.bundle.min.mjs and
// dist/ort-wasm-simd-threaded.wasm (gzipped) in api/ui/ort/, fetched by .ci/onnxruntime-web at
// setup and loaded only when asked for. The graph's inputs are in docs/onnx.md.
const ORT_DIR = "/ui/ort/";
const ORT_SCRIPT = `${ORT_DIR}ort.wasm.bundle.min.mjs`;
const local = { ort: null, session: null, sha256: null, name: null, version: null, bytes: 0 };

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function onnxSession() {
  if (!local.ort) {
    local.ort = await import(ORT_SCRIPT);
    // the glue code is in the bundle: only the .wasm is fetched
    local.ort.env.wasm.wasmPaths = { wasm: `${ORT_DIR}ort-wasm-simd-threaded.wasm` };
    local.ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation; one is plenty
  }
  // revalidated against its ETag by the browser's cache: a new champion is downloaded once
  const response = await fetch(`${API}/model.onnx`);
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new Error(body && body.error ? body.error.message : `the server answered ${response.status}`);
  }
  const sha256 = response.headers.get("x-model-sha256");
  if (local.session && sha256 === local.sha256) return local;
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (crypto.subtle && hex(await crypto.subtle.digest("SHA-256", bytes)) !== sha256) {
    throw new Error("the downloaded graph does not match its X-Model-SHA256 header");
  }
  local.session = await local.ort.InferenceSession.create(bytes);
  Object.assign(local, {
    sha256, bytes: bytes.length,
    name: response.headers.get("x-model-name"), version: response.headers.get("x-model-version"),
  });
  return local;
}

function localProblems(row) {
  // the contract's checks the graph needs (required values, bounds, categories): the server
  // would refuse such a row, so the browser does not score it either
  const problems = [];
  for (const field of state.fields) {
    const value = row[field.name];
    if (value === undefined || value === null) {
      if (field.required) problems.push([field.name, "Field required"]);
    } else if (field.type === "numeric" && !(value >= field.min && value <= field.max)) {
      problems.push([field.name, `Input should be between ${field.min} and ${field.max}`]);
    } else if (field.type === "categorical" && !field.categories.includes(value)) {
      problems.push([field.name, `Input should be one of ${field.categories.join(", ")}`]);
    }
  }
  return problems;
}

function feedsOf(rows) {
  // one [n, 1] column per model feature: strings ("" when missing) for categories, doubles
  // (NaN when missing; booleans 1 or 0) for the rest
  const { ort, session } = local;
  const types = new Map(state.fields.map((f) => [f.name, f.type]));
  const feeds = {};
  for (const name of session.inputNames) {
    const values = rows.map((row) => row[name]);
    feeds[name] = types.get(name) === "categorical"
      ? new ort.Tensor("string", values.map((v) => (v === null || v === undefined ? "" : String(v))), [rows.length, 1])
      : new ort.Tensor("float64", Float64Array.from(values, (v) => (v === null || v === undefined ? NaN : Number(v))), [rows.length, 1]);
  }
  return feeds;
}

async function browserScores(rows) {
  // rows -> {probabilities: one {class: p} per row, model: what answered}; the page's button
  // and tests/test_e2e_ui.py both call this
  await onnxSession();
  const output = await local.session.run(feedsOf(rows));
  const tensor = output.probabilities;
  const k = tensor.dims[1];
  const probabilities = rows.map((_, i) =>
    Object.fromEntries(state.classes.map((name, j) => [name, Number(tensor.data[i * k + j])])));
  return { probabilities, model: { name: local.name, version: local.version, sha256: local.sha256, bytes: local.bytes } };
}

function localLabel(p) {
  const info = state.info;
  if (info.task === "binary") {
    const positive = state.classes[state.classes.length - 1];
    return p[positive] >= info.decision_threshold ? positive : state.classes[0];
  }
  return Object.entries(p).reduce((best, entry) => (entry[1] > best[1] ? entry : best))[0];
}

async function scoreInBrowser() {
  clearErrors();
  const button = $("score-local");
  button.disabled = true;
  try {
    const row = readRow();
    const problems = localProblems(row);
    if (problems.length) {
      for (const [name, msg] of problems) {
        $(`f-${name}-error`).textContent = msg;
        $(`f-${name}`).setAttribute("aria-invalid", "true");
      }
      $("form-error").textContent = "The row was not scored: see the fields marked above.";
      return;
    }
    const started = performance.now();
    const { probabilities: [p], model } = await browserScores([row]);
    const ms = performance.now() - started;
    $("local-answer").hidden = false;
    $("local-label").textContent = localLabel(p);
    $("local-model").textContent = `Model ${model.name} version ${model.version}: ONNX graph of ${count(Math.round(model.bytes / 1024))} KB, SHA-256 ${model.sha256.slice(0, 12)}…, ${ms.toFixed(1)} ms.`;
    const rows = $("local-probabilities").tBodies[0];
    rows.replaceChildren(...Object.entries(p).map(([name, value]) => {
      const bar = el("span");
      bar.style.width = `${(value * 100).toFixed(1)}%`;
      return el("tr", { "data-class": name },
        el("th", { scope: "row", text: name }),
        el("td", { class: "num", "data-value": value, text: pct(value) }),
        el("td", { class: "meter", "aria-hidden": "true" }, bar));
    }));
  } catch (error) {
    $("form-error").textContent = `The row was not scored in this browser: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---- Score a file ------------------------------------------------------------------------
function parseCsv(text) {
  const records = [];
  let record = [], cell = "", quoted = false;
  for (let i = text.charCodeAt(0) === 0xfeff ? 1 : 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') { cell += '"'; i++; }
      else if (ch === '"') quoted = false;
      else cell += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ",") { record.push(cell); cell = ""; }
    else if (ch === "\n" || ch === "\r") {
      if (ch === "\r" && text[i + 1] === "\n") i++;
      record.push(cell); cell = "";
      if (record.length > 1 || record[0] !== "") records.push(record);
      record = [];
    } else cell += ch;
  }
  record.push(cell);
  if (record.length > 1 || record[0] !== "") records.push(record);
  return records;
}

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
const BOOLEANS = { true: true, false: false, yes: true, no: false, 1: true, 0: false };

function cellValue(field, cell) {
  // what cannot be converted goes as text: the server names the row and field it refuses
  if (!field) return cell;
  if (field.type === "numeric" && NUMBER.test(cell.trim())) return Number(cell);
  if (field.type === "boolean" && cell.trim().toLowerCase() in BOOLEANS) return BOOLEANS[cell.trim().toLowerCase()];
  return cell;
}

function rowsOf(records) {
  const [header, ...lines] = records;
  const byName = new Map(state.fields.map((f) => [f.name, f]));
  const columns = header.map((name) => name.trim());
  return lines.map((cells) => {
    const row = {};
    columns.forEach((name, i) => {
      const cell = cells[i] === undefined ? "" : cells[i];
      if (cell !== "") row[name] = cellValue(byName.get(name), cell);
    });
    return row;
  });
}

function progress(value, text) {
  $("progress").value = value;
  $("progress-text").textContent = `${value}% · ${text}`;
}

async function scoreFile(event) {
  event.preventDefault();
  $("file-error").textContent = "";
  const file = $("csv").files[0];
  if (!file) { $("file-error").textContent = "Choose a CSV file first."; return; }
  const button = $("upload");
  button.disabled = true;
  $("results").hidden = true;
  $("task").hidden = false;
  try {
    progress(0, `reading ${file.name}`);
    const rows = rowsOf(parseCsv(await file.text()));
    if (rows.length === 0) throw new Error("the file has no rows under its header");
    progress(10, `sending ${count(rows.length)} rows`);
    const submitted = await call(`${API}/tasks`, { json: { instances: rows } });
    if (!submitted.ok) throw new Error(errorMessage(submitted));
    const id = submitted.body.task_id;
    state.task = { id, name: file.name.replace(/\.csv$/i, "") };
    let status = submitted.body;
    while (status.status !== "succeeded") {
      if (status.status === "failed") throw new Error(`task ${id} failed: ${status.error}`);
      progress(TASK_STAGES[status.status], `task ${id}: ${status.status}, ${count(status.rows)} rows`);
      await new Promise((done) => setTimeout(done, POLL_MS));
      const polled = await call(`${API}/tasks/${id}`);
      if (!polled.ok) throw new Error(errorMessage(polled));
      status = polled.body;
    }
    progress(TASK_STAGES.succeeded, `task ${id}: fetching the results`);
    const result = await call(`${API}/tasks/${id}/result`);
    if (!result.ok) throw new Error(errorMessage(result));
    showResults(result.body);
    progress(100, `task ${id}: done, ${count(rows.length)} rows`);
    $("progress").dataset.task = id;
  } catch (error) {
    $("file-error").textContent = `The file was not scored: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function resultColumns() {
  return ["row", "key", "label", "score", "confidence", "source", "fallback_reason", "arm",
    "model_version", ...state.classes.map((c) => `probability_${c}`), "error"];
}

function resultRecords(result) {
  const errors = new Map(result.errors.map((e) => [e.index, e.message]));
  return result.predictions.map((p, index) => {
    if (p === null) return [index, "", "", "", "", "", "", "", "", ...state.classes.map(() => ""), errors.get(index) || ""];
    const probabilities = state.classes.map((c) => (p.probabilities ? p.probabilities[c] : null));
    return [index, p.key, p.label, p.score, p.confidence, p.source, p.fallback_reason, p.arm, p.model_version, ...probabilities, ""];
  });
}

function showResults(result) {
  const scored = result.predictions.filter((p) => p !== null).length;
  state.results = resultRecords(result);
  state.page = 0;
  $("results").hidden = false;
  $("results-summary").textContent = `${count(result.predictions.length)} rows: ${count(scored)} scored, ${count(result.errors.length)} invalid (model ${result.model.name} version ${result.model.version}).`;
  $("results-table").tHead.replaceChildren(el("tr", {}, ...resultColumns().map((c) => el("th", { scope: "col", text: c }))));
  const invalid = $("invalid");
  invalid.replaceChildren(...result.errors.map((e) => el("li", { "data-row": e.index, text: `row ${e.index}: ${e.message}` })));
  $("invalid-none").hidden = result.errors.length > 0;
  showPage();
}

function showPage() {
  const records = state.results;
  const pages = Math.max(1, Math.ceil(records.length / PAGE_ROWS));
  state.page = Math.min(Math.max(state.page, 0), pages - 1);
  const start = state.page * PAGE_ROWS;
  const invalid = resultColumns().indexOf("label");
  const shown = records.slice(start, start + PAGE_ROWS)
    .map((r) => (r[r.length - 1] ? r.map((v, i) => (i === invalid ? "invalid (see below)" : v)) : r));
  $("results-table").tBodies[0].replaceChildren(...shown.map((record) => el("tr", {},
    ...record.map((value, i) => i === record.length - 1
      ? el("td", { class: "row-error", title: value, text: value })
      : el("td", { class: typeof value === "number" ? "num" : null, text: typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4) : value ?? "" })))));
  $("page-info").textContent = `rows ${count(start)}–${count(start + shown.length - 1)} of ${count(records.length)} · page ${state.page + 1} of ${pages}`;
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
}

function csvCell(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function download() {
  const lines = [resultColumns(), ...state.results].map((r) => r.map(csvCell).join(","));
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
  const link = el("a", { href: URL.createObjectURL(blob), download: `${state.task.name}-scores.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---- Model and health --------------------------------------------------------------------
function facts(pairs) {
  return el("dl", { class: "facts" }, ...pairs.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
}

function ref(m) { return `${m.name} version ${m.version} (alias ${m.alias}, ${m.flavor})`; }

function showModel(info) {
  const r = info.routing;
  const mode = { off: "off: the champion answers every request", split: `split: ${pct(r.share)} of keys get the challenger's answer`, shadow: "shadow: the challenger scores every row too, never returned" }[r.mode] || r.mode;
  const parts = [facts([
    ["Use case", `${info.use_case} (${info.task}, contract version ${info.contract_version})`],
    ["Classes", info.classes.join(", ")],
    ["Decision threshold", String(info.decision_threshold)],
    ["Champion", ref(r.champion)],
    ["Challenger", r.challenger ? ref(r.challenger) : "none"],
    ["Mode", mode],
  ])];
  const models = Object.entries(info.models);
  parts.push(el("div", { class: "table-wrap" }, el("table", {},
    el("caption", { text: "The champion's models" }),
    el("thead", {}, el("tr", {}, ...["component", "registered model", "version", "alias", "MLflow run", "imported", "SHA-256"].map((t) => el("th", { scope: "col", text: t })))),
    el("tbody", {}, ...models.map(([component, m]) => el("tr", {}, ...[component, m.registered_name, m.registered_version, m.alias, m.run_id.slice(0, 12), m.imported_at.slice(0, 19).replace("T", " "), m.sha256.slice(0, 12)].map((t) => el("td", { text: t }))))))));
  const metrics = [...new Set(models.flatMap(([, m]) => Object.keys(m.metrics)))].sort();
  const measured = models.filter(([, m]) => Object.keys(m.metrics).length);
  if (metrics.length) {
    parts.push(el("div", { class: "table-wrap" }, el("table", { id: "metrics" },
      el("caption", { text: "Held-out metrics" }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "metric" }), ...measured.map(([c]) => el("th", { scope: "col", text: c })))),
      el("tbody", {}, ...metrics.map((name) => el("tr", {}, el("th", { scope: "row", text: name }),
        ...measured.map(([, m]) => el("td", { class: "num", text: m.metrics[name] === undefined ? "–" : m.metrics[name].toFixed(4) }))))))));
  }
  $("model-info").replaceChildren(...parts);
}

function showDrift(report) {
  const status = $("drift-status");
  const limits = report.thresholds;
  const rows = `the last ${count(report.window_rows)} rows against model version ${report.model_version}'s training data`;
  const drifting = report.drifting.length > 6
    ? `${report.drifting.slice(0, 6).join(", ")} and ${report.drifting.length - 6} more`
    : report.drifting.join(", ");
  const words = {
    ok: ["No drift", `every PSI is under ${limits.warning} over ${rows}.`],
    warning: ["Warning", `PSI at or over ${limits.warning} for ${drifting}, over ${rows}.`],
    drift: ["Drift", `PSI at or over ${limits.warning} for ${drifting} (over ${limits.drift} for at least one), over ${rows}.`],
    insufficient_data: ["Not measured yet", `${count(report.window_rows)} recent rows of the ${count(report.min_rows)} needed.`],
    unavailable: ["Not measured", "the model has no training reference."],
  }[report.status] || [report.status, ""];
  status.replaceChildren(el("strong", { class: `status-${report.status}`, text: words[0] }), `: ${words[1]}`);
  const chart = $("drift");
  chart.replaceChildren();
  const values = Object.entries(report.features);
  if (report.score !== null) values.push(["score", report.score]);
  if (!values.length) return;
  const top = limits.drift * 2;  // a fixed scale: longer bars end at its edge, values beside the name
  const at = (x) => `${(Math.min(x, top) / top) * 100}%`;
  const lines = () => [limits.warning, limits.drift].map((x) => { const l = el("span", { class: "limit" }); l.style.left = at(x); return l; });
  const scale = el("div", { class: "scale", "aria-hidden": "true" });
  for (const [x, name] of [[limits.warning, `${limits.warning} warning`], [limits.drift, `${limits.drift} drift`], [top, `${top}+`]]) {
    const tick = el("span", { text: name, class: x === top ? "end" : null });
    tick.style.left = at(x);
    scale.append(tick);
  }
  chart.setAttribute("role", "list");
  chart.setAttribute("aria-label", "PSI per feature");
  chart.append(el("div", { class: "name", text: "PSI" }), scale);
  for (const [name, value] of values) {
    const level = value >= limits.drift ? "drift" : value >= limits.warning ? "warning" : "ok";
    const bar = el("span", { class: `bar psi ${level}${value > top ? " over" : ""}`, "data-feature": name });
    bar.style.width = at(value);
    chart.append(el("div", { class: "name", role: "listitem" }, el("b", { text: name }), `: ${value.toFixed(3)}`),
      el("div", { class: "track", "aria-hidden": "true" }, bar, ...lines()));
  }
}

async function refreshHealth() {
  const [model, drift] = await Promise.all([call(`${API}/model`), call(`${API}/drift`)]);
  if (model.ok) showModel(model.body);
  else $("model-info").textContent = `What serves is unknown: ${errorMessage(model)}`;
  if (drift.ok) showDrift(drift.body);
  else $("drift-status").textContent = `Drift is unknown: ${errorMessage(drift)}`;
  return model.ok ? model.body : null;
}

// ---- start -------------------------------------------------------------------------------
async function start() {
  try {
    const health = refreshHealth();  // in parallel with the contract
    const [spec, presets] = await Promise.all([
      fetch("/docs.json").then((r) => r.json()),
      fetch("/ui/examples.json").then((r) => r.json()),
    ]);
    state.fields = fieldsOf(spec);
    buildForm(presets);
    const info = await health;
    state.info = info;
    state.classes = info ? info.classes : [];
    if (info) {
      $("title").textContent = `Scoring: ${info.use_case}`;
      document.title = `Scoring: ${info.use_case}`;
    }
    $("subtitle").textContent = state.rowDescription;
    $("file-form").addEventListener("submit", scoreFile);
    $("download").addEventListener("click", download);
    $("prev").addEventListener("click", () => { state.page -= 1; showPage(); });
    $("next").addEventListener("click", () => { state.page += 1; showPage(); });
    $("refresh").addEventListener("click", refreshHealth);
    $("score-local").addEventListener("click", scoreInBrowser);
    performance.mark("ui-ready");  // the form works from here: the page's time to interactive
    document.body.dataset.ready = "true";
  } catch (error) {
    $("load-error").hidden = false;
    $("load-error").textContent = `The page could not load the service's contract: ${error.message}`;
  }
}

start();
