// The chat page: streams answers from POST /v1/chat/completions (server-sent events read
// through fetch), keeps the conversation in the page, and stops a reply by aborting its request
// (the server cancels the generation when the connection closes).
import { apiFetch, byId, errorMessage } from "./common.js";

const conversation = [];   // {role, content} turns sent with every request
let modelId = null;
let inFlight = null;       // the AbortController of the request being answered
let chatNumber = 0;        // "new chat" bumps it: a reply still ending then must not touch the new one

async function showModel() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data;
    modelId = models.length ? models[0].id : null;
    byId("model").textContent = modelId ? `model ${modelId}` : "no model loaded";
  } catch (error) {
    byId("model").textContent = `cannot reach the server: ${error.message}`;
  }
}

function addMessage(role, text) {
  byId("empty")?.remove();
  const message = document.createElement("div");
  message.className = `message ${role}`;
  message.textContent = text;
  byId("messages").append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

function requestBody() {
  const messages = [];
  const system = byId("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = { model: modelId, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(byId("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(byId("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// The JSON payloads of a server-sent event stream, up to "[DONE]".
async function* serverEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// Tokens, tokens/s after the first token (decode speed) and time to the first token.
class Stats {
  constructor() { this.started = performance.now(); this.first = null; this.tokens = 0; this.last = null; }
  chunk() {
    this.last = performance.now();
    this.first ??= this.last;
    this.tokens += 1;
  }
  text(finish) {
    if (this.first === null) return finish ? `no tokens (${finish})` : "waiting for the first token…";
    const decodeS = (this.last - this.first) / 1000;
    const rate = this.tokens > 1 && decodeS > 0 ? ((this.tokens - 1) / decodeS).toFixed(1) : "–";
    const ttft = ((this.first - this.started) / 1000).toFixed(2);
    const ending = finish ? ` · ${finish}` : "";
    return `${this.tokens} tokens · ${rate} tokens/s · first token ${ttft} s${ending}`;
  }
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  byId("send").hidden = busy;
  byId("stop").hidden = !busy;
}

async function send(text) {
  const chat = chatNumber;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const stats = new Stats();
  const controller = new AbortController();
  inFlight = controller;
  setBusy(true);
  let answer = "";
  let finish = null;
  const show = () => { byId("stats").textContent = stats.text(finish); };
  show();
  try {
    if (!modelId) await showModel();
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of serverEvents(response.body)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        answer += choice.delta.content;
        reply.textContent = answer;
        stats.chunk();
        reply.scrollIntoView({ block: "end" });
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (event.usage) stats.tokens = event.usage.completion_tokens;
      show();
    }
    if (chat === chatNumber) conversation.push({ role: "assistant", content: answer });
  } catch (error) {
    if (chat !== chatNumber) return;
    if (controller.signal.aborted) {
      finish = "stopped";
      if (answer) conversation.push({ role: "assistant", content: answer });
      else conversation.pop();
      reply.append(Object.assign(document.createElement("span"), { className: "note", textContent: " (stopped)" }));
    } else {
      conversation.pop();   // the turn failed: leave it out of the next request
      reply.classList.add("error");
      reply.textContent = answer ? `${answer}\n` : "";
      reply.append(Object.assign(document.createElement("span"), { className: "note", textContent: error.message }));
    }
  } finally {
    inFlight = null;
    reply.classList.remove("streaming");
    if (chat === chatNumber) show();
    setBusy(false);
    byId("prompt").focus();
  }
}

byId("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = byId("prompt").value.trim();
  if (!text || inFlight) return;
  byId("prompt").value = "";
  send(text);
});
byId("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    byId("composer").requestSubmit();
  }
});
byId("stop").addEventListener("click", () => inFlight?.abort());
byId("new-chat").addEventListener("click", () => {
  chatNumber += 1;
  inFlight?.abort();
  conversation.length = 0;
  byId("messages").replaceChildren();
  byId("stats").textContent = "";
});
showModel();
