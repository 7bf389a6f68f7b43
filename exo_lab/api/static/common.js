// Shared by the chat page and the dashboard: the API key and calls to this server's /v1 API.
// The key is asked for only when the server answers 401, and kept in this tab's sessionStorage.

const KEY_STORAGE = "exo-lab-api-key";
let pendingKey = null;

export const byId = (id) => document.getElementById(id);

function withKey(headers) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

// fetch() with the API key; a 401 asks the user for the key and tries again.
export async function apiFetch(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: withKey(options.headers || {}) });
    if (response.status !== 401) return response;
    const refused = sessionStorage.getItem(KEY_STORAGE);
    const reason = await errorMessage(response);
    await askForKey(refused ? `The server refused that key: ${reason}` : "This server needs its API key.");
  }
}

// The message of an OpenAI-shaped error body, else the HTTP status.
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// The dialog that asks for the key, made on first use: <dialog id="key-dialog">.
function keyDialog() {
  let dialog = byId("key-dialog");
  if (dialog) return dialog;
  dialog = document.createElement("dialog");
  dialog.id = "key-dialog";
  const form = document.createElement("form");
  const reason = Object.assign(document.createElement("p"), { className: "key-reason" });
  const label = document.createElement("label");
  const input = Object.assign(document.createElement("input"),
    { type: "password", name: "key", autocomplete: "off", required: true });
  label.append("API key ", input);
  const button = Object.assign(document.createElement("button"), { type: "submit", textContent: "Use this key" });
  const note = Object.assign(document.createElement("p"),
    { className: "muted", textContent: "Kept in this browser tab only (sessionStorage)." });
  form.append(reason, label, button, note);
  dialog.append(form);
  document.body.append(dialog);
  return dialog;
}

// Shows the key dialog (one at a time); resolves once a key is stored, rejects on Escape.
function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = keyDialog();
  const form = dialog.querySelector("form");
  const input = dialog.querySelector("input");
  dialog.querySelector(".key-reason").textContent = reason;
  input.value = "";
  pendingKey = new Promise((resolve, reject) => {
    const done = (ok) => {
      form.onsubmit = null;
      dialog.oncancel = null;
      pendingKey = null;
      dialog.close();
      ok ? resolve() : reject(new Error("no API key given: the server needs one"));
    };
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      done(true);
    };
    dialog.oncancel = (event) => {
      event.preventDefault();
      done(false);
    };
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}

// Bytes in decimal units with one decimal, as exo_lab.units.format_bytes writes them.
export function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let value = Math.abs(bytes);
  let index = 0;
  while (index < units.length - 1 && Math.round(value * 10) / 10 >= 1000) {
    value /= 1000;
    index += 1;
  }
  const sign = bytes < 0 ? "-" : "";
  if (index === 0) return `${sign}${Math.trunc(value)} B`;
  return `${sign}${value.toFixed(1).replace(/\.0$/, "")} ${units[index]}`;
}
