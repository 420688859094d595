// The draw-a-digit page: strokes on a 280x280 canvas (white on black, ~19 px wide so the digit
// looks like MNIST once scaled to 28x28) are sent as PNG to /v1/search when each stroke ends.
"use strict";

const STROKE_WIDTH = 19;
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const statusLine = document.getElementById("status");
const predicted = document.getElementById("predicted");
const neighborList = document.getElementById("neighbors");
const kInput = document.getElementById("k");
const fileInput = document.getElementById("file");

let drawing = false;
let last = null;
let lastQuery = null; // {blob, name}: what k changes re-send
let requestSeq = 0; // answers to superseded requests are dropped

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  lastQuery = null;
  predicted.textContent = "–";
  neighborList.replaceChildren();
  statusLine.textContent = "Draw a digit: results appear when the stroke ends.";
  statusLine.classList.remove("error");
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
  } catch {
    clearPad(); // the service says what is wrong with the file
  }
  search({ blob: file, name: file.name });
});

kInput.addEventListener("change", () => {
  if (lastQuery) search(lastQuery);
});

function k() {
  const value = Math.round(Number(kInput.value));
  return Number.isFinite(value) ? Math.min(Math.max(value, 1), 100) : 8;
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
    const response = await fetch(`/v1/search?k=${k()}`, { method: "POST", body: form });
    const answer = await response.json();
    if (seq !== requestSeq) return;
    if (!response.ok) throw new Error(answer.error || response.statusText);
    show(answer, performance.now() - started);
  } catch (error) {
    if (seq !== requestSeq) return;
    predicted.textContent = "–";
    neighborList.replaceChildren();
    statusLine.textContent = error.message;
    statusLine.classList.add("error");
  }
}

function show(answer, ms) {
  const label = answer.predicted_label;
  predicted.textContent = label === null ? "?" : String(label);
  neighborList.replaceChildren(
    ...answer.neighbors.map((neighbor) => {
      const item = document.createElement("li");
      item.className = "neighbor";
      if (label !== null && neighbor.label !== label) item.classList.add("other");
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
      `FAISS ${info.factory}, encoder ${info.encoder}`;
  } catch {
    // the footer is decoration; searches report their own errors
  }
}

clearPad();
showInfo();
