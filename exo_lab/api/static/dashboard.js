// The dashboard: polls GET /v1/cluster/status (cluster.status(), what the notebook widget
// shows, with the widget's own lines and rows under "display") and draws it, with the plan's
// placement as an SVG picture like exo_lab.notebook.plot_placement, and the load per client.
import { apiFetch, byId, errorMessage, formatBytes } from "./common.js";

const POLL_INTERVAL_MS = 1000;
const SPARK_POINTS = 60;
// exo_lab.notebook.plots: stage colours, memory parts, free budget.
const STAGE_COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const MEMORY_PARTS = [["weights", "#2563eb"], ["KV cache", "#f59e0b"], ["workspace + overhead", "#64748b"]];
const FREE_COLOR = "#e5e7eb";
const SVG = "http://www.w3.org/2000/svg";

const tokensPerSecond = [];
let polls = 0;
let drawnPlan = null;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function memoryCell(engine) {
  const td = cell("", "memory");
  if (engine.memory_fraction !== null) {
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    const fraction = engine.memory_fraction;
    fill.className = `fill ${fraction < 0.7 ? "ok" : fraction < 0.9 ? "high" : "full"}`;
    fill.style.width = `${Math.max(1, Math.min(100, fraction * 100)).toFixed(1)}%`;
    bar.append(fill);
    td.append(bar);
  }
  td.append(document.createTextNode(engine.memory_text));
  return td;
}

function engineRow(engine) {
  const row = document.createElement("tr");
  row.dataset.engine = engine.engine_id;
  const state = cell(engine.state, `state state-${engine.state}`);
  if (engine.error) state.title = engine.error;
  row.append(cell(String(engine.engine_id)), cell(engine.node), cell(engine.hostname), cell(engine.device),
    cell(engine.roles), cell(engine.layers, "layers"), cell(engine.speed, "speed"), memoryCell(engine), state);
  return row;
}

// The "clients" section (made here, below the engines): each client's KV slots held and
// requests queued, under the opaque label the status gives (never an address, a key or a prompt).
function clientsBody() {
  const existing = byId("clients");
  if (existing) return existing.tBodies[0];
  const table = document.createElement("table");
  table.id = "clients";
  const head = table.createTHead().insertRow();
  for (const name of ["client", "running (KV slots)", "queued"]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  wrap.append(table);
  const heading = document.createElement("h2");
  heading.textContent = "clients";
  const section = document.createElement("section");
  section.append(heading, wrap);
  byId("engines").closest("section").after(section);
  return table.createTBody();
}

function drawClients(clients) {
  const rows = clients.map((client) => {
    const row = document.createElement("tr");
    row.append(cell(client.client), cell(String(client.running)), cell(String(client.queued)));
    return row;
  });
  if (!rows.length) {
    const row = document.createElement("tr");
    const empty = cell("no requests now", "muted");
    empty.colSpan = 3;
    row.append(empty);
    rows.push(row);
  }
  clientsBody().replaceChildren(...rows);
}

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// Layers per node on the left, planned memory against each node's budget on the right.
function placementSvg(plan) {
  const stages = plan.stages;
  const unused = plan.unused_nodes || [];
  const layers = stages[stages.length - 1].stop_layer;
  const row = 30, top = 24, width = 760;
  const layerX = 150, layerW = 250, memX = 420, memW = 230;
  const height = top + row * (stages.length + unused.length) + 28;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "placement",
    "aria-label": `placement of ${plan.model}` });
  svg.append(svgElement("text", { x: layerX, y: 14, class: "axis" }, `decoder layers (of ${layers})`),
    svgElement("text", { x: memX, y: 14, class: "axis" }, "memory (planned) against the budget"));
  const largest = Math.max(...stages.map((s) => Math.max(s.budget_bytes, s.total_bytes)));
  stages.forEach((stage, index) => {
    const y = top + index * row;
    const color = STAGE_COLORS[index % STAGE_COLORS.length];
    const x0 = layerX + (layerW * stage.start_layer) / layers;
    const w = (layerW * (stage.stop_layer - stage.start_layer)) / layers;
    const roles = [stage.start_layer === 0 ? "embed" : null, stage.stop_layer === layers ? "head" : null].filter(Boolean);
    const label = `${stage.start_layer}-${stage.stop_layer - 1}${roles.length ? ` + ${roles.join(", ")}` : ""}`;
    svg.append(svgElement("text", { x: 0, y: y + 15, class: "node" }, stage.node),
      svgElement("rect", { x: layerX, y, width: layerW, height: 20, fill: FREE_COLOR }),
      svgElement("rect", { x: x0, y, width: Math.max(w, 1), height: 20, fill: color, class: "stage" }));
    const inside = w >= 90;
    svg.append(svgElement("text", { x: inside ? x0 + w / 2 : x0 + w + 4, y: y + 14,
      class: inside ? "inside" : "beside", "text-anchor": inside ? "middle" : "start" }, label));
    const parts = [stage.weights_bytes, stage.kv_cache_bytes, stage.total_bytes - stage.weights_bytes - stage.kv_cache_bytes];
    let x = memX;
    parts.forEach((bytes, part) => {
      const partW = (memW * Math.max(bytes, 0)) / largest;
      svg.append(svgElement("rect", { x, y, width: partW, height: 20, fill: MEMORY_PARTS[part][1] }));
      x += partW;
    });
    const freeW = (memW * Math.max(stage.budget_bytes - stage.total_bytes, 0)) / largest;
    svg.append(svgElement("rect", { x, y, width: freeW, height: 20, fill: FREE_COLOR, class: "free" }),
      svgElement("text", { x: x + freeW + 4, y: y + 14, class: "beside" },
        `${formatBytes(stage.total_bytes)} / ${formatBytes(stage.budget_bytes)}`));
  });
  unused.forEach((node, index) => {
    const y = top + (stages.length + index) * row;
    svg.append(svgElement("text", { x: 0, y: y + 15, class: "node" }, node.node),
      svgElement("text", { x: layerX, y: y + 15, class: "unused" }, `unused: ${node.reason}`));
  });
  let x = layerX;
  for (const [name, color] of [...MEMORY_PARTS, ["free of budget", FREE_COLOR]]) {
    svg.append(svgElement("rect", { x, y: height - 16, width: 10, height: 10, fill: color, class: "key" }),
      svgElement("text", { x: x + 14, y: height - 7, class: "legend" }, name));
    x += 34 + name.length * 6.2;
  }
  return svg;
}

function drawPlacement(plan) {
  const key = JSON.stringify(plan);
  if (key === drawnPlan) return;
  drawnPlan = key;
  const target = byId("placement");
  if (!plan || !plan.stages?.length) {
    target.textContent = "no model loaded";
    return;
  }
  target.replaceChildren(placementSvg(plan));
}

function drawSparkline(value) {
  tokensPerSecond.push(value);
  if (tokensPerSecond.length > SPARK_POINTS) tokensPerSecond.shift();
  const peak = Math.max(1, ...tokensPerSecond);
  const points = tokensPerSecond.map((v, i) => `${(i * 120) / (SPARK_POINTS - 1)},${27 - (v / peak) * 26}`);
  byId("sparkline").replaceChildren(svgElement("polyline", { points: points.join(" "), class: "spark" }));
}

// The widget's model line, plus the names an OpenAI client sends as "model" unless that is the id.
function modelLine(status) {
  const names = status.served_model_names ?? [];
  const line = status.display.model;
  if (!names.length || (names.length === 1 && names[0] === status.model)) return line;
  return `${line} · API model name${names.length > 1 ? "s" : ""}: ${names.join(", ")}`;
}

function render(status) {
  const display = status.display;
  byId("title").textContent = display.title;
  byId("title").className = `title state-${status.state.replace(" ", "-")}`;
  byId("model-line").textContent = modelLine(status);
  byId("metrics-line").textContent = display.metrics;
  const metrics = status.metrics;
  byId("tokens-per-s").textContent = metrics ? metrics.tokens_per_s.toFixed(1) : "–";
  byId("in-flight").textContent = metrics ? metrics.requests_in_flight : "–";
  byId("requests").textContent = metrics ? metrics.requests_total : "–";
  byId("tokens").textContent = metrics ? metrics.tokens_total : "–";
  drawSparkline(metrics ? metrics.tokens_per_s : 0);
  byId("engines").tBodies[0].replaceChildren(...display.engines.map(engineRow));
  drawClients(status.clients ?? []);
  drawPlacement(status.plan);
}

async function poll() {
  const updated = byId("updated");
  try {
    const response = await apiFetch("/v1/cluster/status");
    if (!response.ok) throw new Error(await errorMessage(response));
    render(await response.json());
    polls += 1;
    document.body.dataset.polls = polls;
    updated.textContent = `updated ${new Date().toLocaleTimeString()} · every ${POLL_INTERVAL_MS / 1000} s`;
    updated.classList.remove("error");
  } catch (error) {
    updated.textContent = `cannot read the cluster's status: ${error.message}; trying again`;
    updated.classList.add("error");
  } finally {
    setTimeout(poll, POLL_INTERVAL_MS);
  }
}

poll();
