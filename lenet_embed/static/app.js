// The draw-a-digit page: strokes on a 280x280 canvas (white on black, ~19 px wide so the digit
// looks like MNIST once scaled to 28x28) are sent as PNG to /v1/search when each stroke ends.
// When the service takes writes (/v1/info says so), the drawing can be added to the index with a
// label: POST /v1/items with the write token, which is kept in this tab's sessionStorage only.
"use strict";

const STROKE_WIDTH = 19;
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const statusLine = document.getElementById("status");
const predicted = document.getElementById("predicted");
const confidence = document.getElementById("confidence");
const neighborList = document.getElementById("neighbors");
const kInput = document.getElementById("k");
const minConfidenceInput = document.getElementById("min-confidence");
const fileInput = document.getElementById("file");
const addForm = document.getElementById("add");
const addKind = document.getElementById("add-kind");
const digitLabel = document.getElementById("add-label");
const classLabel = document.getElementById("add-class");
const classList = document.getElementById("add-classes");
const tokenInput = document.getElementById("token");
const addButton = document.getElementById("add-button");
const addStatus = document.getElementById("add-status");
const TOKEN_KEY = "lenet-embed-write-token";

let drawing = false;
let last = null;
let lastQuery = null; // {blob, name}: what k changes re-send
let requestSeq = 0; // answers to superseded requests are dropped
let hasInk = false; // whether the canvas holds a drawing to add
let labelChosen = false; // the user picked the digit: predictions no longer preselect it
let classNames = false; // the bundle's labels are class names (free text), not digits
let justAdded = null; // id of the item added last, marked in the results

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  lastQuery = null;
  predicted.textContent = "–";
  neighborList.replaceChildren();
  statusLine.textContent = "Draw a digit: results appear when the stroke ends.";
  statusLine.classList.remove("error");
  hasInk = false;
  labelChosen = false;
  setAddStatus("", false);
}

function canvasPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * pad.width) / box.width,
    y: ((event.clientY - box.top) * pad.height) / box.height,
  };
}

function strokeTo(point) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = STROKE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  last = point;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  hasInk = true;
  last = canvasPoint(event);
  strokeTo(last); // a dot for a tap
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const each of events.length ? events : [event]) strokeTo(canvasPoint(each));
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  pad.toBlob((blob) => search({ blob, name: "canvas.png" }), "image/png");
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", clearPad);

fileInput.addEventListener("change", async () => {
  const file = fileInput.files[0];
  if (!file) return;
  fileInput.value = "";
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const width = bitmap.width * scale;
    const height = bitmap.height * scale;
    clearPad();
    ctx.drawImage(bitmap, (pad.width - width) / 2, (pad.height - height) / 2, width, height);
    hasInk = true;
  } catch {
    clearPad(); // the service says what is wrong with the file
  }
  search({ blob: file, name: file.name });
});

kInput.addEventListener("change", () => {
  if (lastQuery) search(lastQuery);
});
minConfidenceInput.addEventListener("change", () => {
  if (lastQuery) search(lastQuery);
});

function k() {
  const value = Math.round(Number(kInput.value));
  return Number.isFinite(value) ? Math.min(Math.max(value, 1), 100) : 8;
}

// The search's query string: k, and min_confidence when one is set (empty: the index's own).
function searchParams() {
  const params = new URLSearchParams({ k: String(k()) });
  const text = minConfidenceInput.value.trim();
  const value = Number(text);
  if (text !== "" && Number.isFinite(value)) {
    params.set("min_confidence", String(Math.min(Math.max(value, 0), 1)));
  }
  return params.toString();
}

async function search(query) {
  lastQuery = query;
  const seq = ++requestSeq;
  const form = new FormData();
  form.append("file", query.blob, query.name);
  statusLine.textContent = "Searching…";
  statusLine.classList.remove("error");
  const started = performance.now();
  try {
    const response = await fetch(`/v1/search?${searchParams()}`, { method: "POST", body: form });
    const answer = await response.json();
    if (seq !== requestSeq) return;
    if (!response.ok) throw new Error(answer.error || response.statusText);
    show(answer, performance.now() - started);
    preselectLabel(answer.predicted_label);
  } catch (error) {
    if (seq !== requestSeq) return;
    predicted.textContent = "–";
    predicted.classList.remove("refused");
    confidence.textContent = "";
    neighborList.replaceChildren();
    statusLine.textContent = error.message;
    statusLine.classList.add("error");
  }
}

function show(answer, ms) {
  const label = answer.predicted_label;
  // No match: say why ("not a digit", "unsure") instead of a big number that would be wrong.
  const refused = !answer.match;
  predicted.textContent = refused ? answer.reason : label === null ? "?" : String(label);
  predicted.classList.toggle("refused", refused);
  confidence.textContent = answer.confidence === null
    ? "" : `confidence ${(answer.confidence * 100).toFixed(1)} %`;
  neighborList.replaceChildren(
    ...answer.neighbors.map((neighbor) => {
      const item = document.createElement("li");
      item.className = "neighbor";
      if (label !== null && neighbor.label !== label) item.classList.add("other");
      if (neighbor.id === justAdded) item.classList.add("added");
      const image = document.createElement("img");
      image.src = `/v1/items/${neighbor.id}/image.png`;
      image.width = 84;
      image.height = 84;
      image.alt = `item ${neighbor.id}, label ${neighbor.label}`;
      const caption = document.createElement("span");
      caption.className = "label";
      caption.textContent = neighbor.label === null ? "–" : String(neighbor.label);
      const distance = document.createElement("span");
      distance.className = "distance";
      distance.textContent = neighbor.distance.toFixed(4);
      item.title = `#${neighbor.rank}: id ${neighbor.id}`;
      item.append(image, caption, distance);
      return item;
    }),
  );
  statusLine.textContent =
    `${answer.neighbors.length} nearest neighbours of ${answer.query} in ${Math.round(ms)} ms`;
}

async function showInfo() {
  try {
    const response = await fetch("/v1/info");
    const info = await response.json();
    document.getElementById("info").textContent =
      `index: ${info.count.toLocaleString("en")} items, ${info.metric}, ` +
      `FAISS ${info.factory}, encoder ${info.encoder}, version ${info.version}`;
    showAddControls(info);
  } catch {
    // the footer is decoration; searches report their own errors
  }
}

// ---------------------------------------------------------------- adding to the index

function showAddControls(info) {
  addForm.hidden = !info.writes;
  if (!info.writes) return;
  classNames = Array.isArray(info.classes) && info.classes.length > 0;
  addKind.textContent = classNames ? "class" : "digit";
  digitLabel.hidden = classNames;
  digitLabel.required = !classNames;
  classLabel.hidden = !classNames;
  classLabel.required = classNames;
  addKind.parentElement.htmlFor = classNames ? "add-class" : "add-label";
  if (classNames) {
    classList.replaceChildren(
      ...info.classes.map((name) => {
        const option = document.createElement("option");
        option.value = name;
        return option;
      }),
    );
  }
}

function preselectLabel(label) {
  // The predicted digit is the likely label; the user's own choice wins.
  if (labelChosen || classNames || label === null) return;
  const value = String(label);
  if ([...digitLabel.options].some((option) => option.value === value)) digitLabel.value = value;
}

function setAddStatus(text, isError) {
  addStatus.textContent = text;
  addStatus.classList.toggle("error", isError);
}

function readToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return ""; // storage disabled: the field still works for this page
  }
}

function keepToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: nothing is kept
  }
}

digitLabel.addEventListener("change", () => {
  labelChosen = true;
});
tokenInput.addEventListener("input", () => keepToken(tokenInput.value.trim()));

addForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const label = (classNames ? classLabel.value : digitLabel.value).trim();
  const token = tokenInput.value.trim();
  if (!hasInk) return setAddStatus("Draw a digit first.", true);
  if (!label) return setAddStatus("Give the drawing a label first.", true);
  if (!token) {
    tokenInput.focus();
    return setAddStatus("Enter the write token first.", true);
  }
  const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("file", blob, "canvas.png");
  form.append("label", label);
  addButton.disabled = true;
  setAddStatus("Adding…", false);
  try {
    const response = await fetch("/v1/items", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
      body: form,
    });
    let answer = {};
    try {
      answer = await response.json();
    } catch {
      // not JSON: the status line below says what happened
    }
    if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
    justAdded = answer.id;
    const shown = answer.label === null ? "no label" : `label ${answer.label}`;
    setAddStatus(`added as id ${answer.id} (${shown}); the index holds ` +
      `${answer.count.toLocaleString("en")} items`, false);
    showInfo();
    search({ blob, name: "canvas.png" }); // the new item is now its nearest neighbour
  } catch (error) {
    setAddStatus(error.message, true);
  } finally {
    addButton.disabled = false;
  }
});

tokenInput.value = readToken();

clearPad();
showInfo();
