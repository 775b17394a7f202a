// The results page: sends an image (a URL or a file) to POST /v1/detect and draws the answer on a
// canvas over the picture, with the JSON beside it. The routes it calls are in docs/api.md.

const $ = (id) => document.getElementById(id);
const form = $("detect-form");
const urlInput = $("url");
const fileInput = $("file");
const dropZone = $("drop");
const thresholdInput = $("threshold");
const masksBox = $("masks");
const classesSelect = $("classes");
const classesHint = $("classes-hint");
const statusLine = $("status");
const errorBox = $("error");
const result = $("result");
const picturePart = result.querySelector(".picture");
const picture = $("picture");
const canvas = $("overlay");
const note = $("note");
const instancesList = $("instances");
const jsonPanel = $("json");

const LINE_WIDTH = 3; // screen pixels
const FONT_SIZE = 14; // screen pixels
const MASK_ALPHA = 0.4;
const MODEL_RETRY_MS = 5000;

let answer = null; // the last detection shown, redrawn when the masks box or the page size changes
let inFlight = null; // the AbortController of the request in flight: a new one supersedes it
let objectUrl = null; // the chosen file's blob: URL, revoked when another picture replaces it

// An error to show the user: its message is complete; body/text are what the server sent.
class RequestError extends Error {
  constructor(message, { status = 0, body = null, text = "" } = {}) {
    super(message);
    this.status = status;
    this.body = body;
    this.text = text;
  }
}

// ---- colours: one per class, the same on every page load and for every image

function hslToRgb(hue, saturation, lightness) {
  const k = (n) => (n + hue / 30) % 12;
  const a = saturation * Math.min(lightness, 1 - lightness);
  const f = (n) => lightness - a * Math.max(-1, Math.min(k(n) - 3, 9 - k(n), 1));
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}

function classColour(label) {
  let hash = 0;
  for (const char of label) hash = (Math.imul(hash, 31) + char.codePointAt(0)) >>> 0;
  // golden-angle steps spread nearby hashes around the colour wheel
  return hslToRgb((hash * 137.508) % 360, 0.75, 0.45);
}

const css = ([r, g, b], alpha = 1) => `rgb(${r} ${g} ${b} / ${alpha})`;
const textColourOn = ([r, g, b]) => (0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff");

// ---- talking to the service

async function callJson(path, init = {}) {
  let response;
  let text;
  try {
    response = await fetch(path, { ...init, headers: { Accept: "application/json", ...init.headers } });
    text = await response.text();
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new RequestError(
      `Could not reach the service (network error: ${err.message}). Check that it is running and try again.`,
    );
  }
  const status = response.status;
  let body;
  try {
    if (!(response.headers.get("Content-Type") || "").includes("json")) throw new TypeError("not JSON");
    body = JSON.parse(text);
  } catch {
    const what = `HTTP ${status}${response.statusText ? " " + response.statusText : ""}`;
    throw new RequestError(`The server answered ${what} with something that is not JSON.`, {
      status,
      text,
    });
  }
  if (response.ok) return body;
  const error = body && typeof body === "object" ? body.error : null;
  if (!error || typeof error.message !== "string") {
    throw new RequestError(`The server answered HTTP ${status} without an error message.`, { status, body });
  }
  let message = `Error ${error.code || "unknown"} (HTTP ${status}): ${error.message}`;
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter) message += ` Try again in ${retryAfter} s.`;
  throw new RequestError(message, { status, body });
}

// ---- the model: classes for the filter, the default and lowest threshold

async function loadModel() {
  const hint = classesHint.textContent;
  for (;;) {
    try {
      const model = await callJson("/v1/model");
      classesHint.textContent = hint;
      for (const name of model.categories || []) classesSelect.add(new Option(name, name));
      classesSelect.disabled = false;
      if (typeof model.min_score_threshold === "number") thresholdInput.min = model.min_score_threshold;
      if (typeof model.score_threshold === "number" && thresholdInput.value === "") {
        thresholdInput.value = model.score_threshold;
      }
      return;
    } catch (err) {
      if (err.status === 503) {
        // not_ready: the model is still loading, which takes a while after a start
        classesHint.textContent = `The model is not ready yet (${err.message}); trying again…`;
        await new Promise((resolve) => setTimeout(resolve, MODEL_RETRY_MS));
        continue;
      }
      classesHint.textContent = `The class filter is unavailable: ${err.message}`;
      return;
    }
  }
}

// ---- detection

function readOptions() {
  const options = { masks: masksBox.checked ? "polygons" : "none" };
  if (thresholdInput.validity.badInput) throw new RequestError("The score threshold must be a number.");
  if (thresholdInput.value !== "") options.threshold = Number(thresholdInput.value);
  const classes = Array.from(classesSelect.selectedOptions, (option) => option.value);
  if (classes.length) options.classes = classes;
  return options;
}

function requestFor(source, options) {
  if (source.kind === "url") {
    return {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ url: source.url, ...options }),
    };
  }
  const data = new FormData();
  data.append("image", source.file, source.file.name);
  for (const [name, value] of Object.entries(options)) {
    data.append(name, Array.isArray(value) ? value.join(",") : String(value));
  }
  return { method: "POST", body: data }; // the browser sets the multipart boundary
}

async function detect(source) {
  inFlight?.abort();
  const controller = new AbortController();
  inFlight = controller;
  errorBox.hidden = true;
  result.setAttribute("aria-busy", "true");
  const name = source.kind === "url" ? source.url : source.file.name;
  statusLine.textContent = `Detecting objects in ${name}…`;
  const started = performance.now();
  try {
    const init = requestFor(source, readOptions());
    const detection = await callJson("/v1/detect", { ...init, signal: controller.signal });
    if (!isDetection(detection)) {
      throw new RequestError("The server's answer is not a detection (no width, height or instances).", {
        status: 200,
        body: detection,
      });
    }
    show(detection, source, (performance.now() - started) / 1000);
  } catch (err) {
    if (err.name === "AbortError") return; // superseded by a newer request, which shows its own
    showFailure(err);
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      result.removeAttribute("aria-busy");
    }
  }
}

function isDetection(value) {
  return (
    value &&
    Number.isFinite(value.width) &&
    Number.isFinite(value.height) &&
    Array.isArray(value.instances) &&
    value.instances.every((item) => typeof item.label === "string" && Array.isArray(item.box))
  );
}

// ---- showing results

function setPicture(source) {
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = null;
  picture.removeAttribute("src"); // a fresh load, so that load/error fire even for the same URL
  picture.hidden = false;
  note.hidden = true;
  let src;
  if (source.kind === "file") {
    src = objectUrl = URL.createObjectURL(source.file);
  } else if (/^https?:/i.test(source.url)) {
    src = source.url; // the browser loads it itself, as any <img> would
  }
  if (src) picture.src = src;
  else pictureFailed();
}

function pictureFailed() {
  picture.hidden = true;
  note.hidden = false;
  note.textContent =
    "Your browser could not load this image itself (the service could), so the detections are drawn on a blank background.";
}

function show(detection, source, seconds) {
  answer = detection;
  result.hidden = false;
  picturePart.hidden = false;
  jsonPanel.textContent = formatJson(detection);
  canvas.width = detection.width;
  canvas.height = detection.height;
  setPicture(source);
  draw();
  listInstances(detection.instances);
  const count = detection.instances.length;
  const found = count
    ? `${count} instance${count === 1 ? "" : "s"}`
    : "Nothing above the threshold";
  statusLine.textContent = `${found} in a ${detection.width}×${detection.height} image (${seconds.toFixed(1)} s).`;
}

function showFailure(err) {
  answer = null;
  errorBox.textContent = err.message;
  errorBox.hidden = false;
  statusLine.textContent = "";
  picturePart.hidden = true;
  if (err.body !== null && err.body !== undefined) {
    jsonPanel.textContent = formatJson(err.body);
    result.hidden = false;
  } else if (err.text) {
    jsonPanel.textContent = err.text.slice(0, 2000); // what came instead of JSON, for diagnosis
    result.hidden = false;
  } else {
    result.hidden = true;
  }
}

function listInstances(instances) {
  instancesList.replaceChildren(
    ...instances.map((instance) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.backgroundColor = css(classColour(instance.label)); // CSSOM: allowed by the CSP
      const box = instance.box.map((v) => Math.round(v)).join(", ");
      item.append(swatch, `${instance.label} ${formatScore(instance.score)}, box [${box}]`);
      return item;
    }),
  );
  const names = instances.slice(0, 20).map((i) => `${i.label} ${formatScore(i.score)}`);
  canvas.setAttribute(
    "aria-label",
    instances.length ? `Detections: ${names.join(", ")}${instances.length > 20 ? ", …" : ""}` : "No detections",
  );
}

// JSON.stringify's indentation, with lists of numbers (boxes, polygons) kept on one line each. A
// list to fold starts with a raw newline, which a JSON string never holds: messages stay intact.
function formatJson(value) {
  const fold = (list) => "[" + list.slice(1, -1).trim().split(/\s*,\s*/).join(", ") + "]";
  return JSON.stringify(value, null, 2).replace(/\[\n[-+\d.eE,\s]*\]/g, fold);
}

const formatScore = (score) => (typeof score === "number" ? score.toFixed(2) : "?");

function draw() {
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!answer) return;
  // image pixels per screen pixel: lines and text keep their size however the picture is scaled
  const scale = Math.max(1, canvas.clientWidth ? canvas.width / canvas.clientWidth : 1);
  const line = LINE_WIDTH * scale;
  const instances = answer.instances;

  // masks first, then boxes, then labels: nothing hides a box's outline or a label
  if (masksBox.checked) {
    for (const instance of instances) {
      const polygons = instance.mask?.polygons;
      if (!Array.isArray(polygons)) continue;
      context.beginPath();
      for (const flat of polygons) {
        if (flat.length < 6) continue;
        context.moveTo(flat[0], flat[1]);
        for (let i = 2; i + 1 < flat.length; i += 2) context.lineTo(flat[i], flat[i + 1]);
        context.closePath();
      }
      context.fillStyle = css(classColour(instance.label), MASK_ALPHA);
      context.fill();
    }
  }

  context.lineWidth = line;
  for (const instance of instances) {
    const [x1, y1, x2, y2] = instance.box;
    context.strokeStyle = css(classColour(instance.label));
    // inset by half the line, so the whole outline stays inside the box (and the image)
    context.strokeRect(x1 + line / 2, y1 + line / 2, Math.max(0, x2 - x1 - line), Math.max(0, y2 - y1 - line));
  }

  const fontSize = FONT_SIZE * scale;
  const pad = 3 * scale;
  const height = fontSize + 2 * pad;
  context.font = `${fontSize}px system-ui, sans-serif`;
  context.textBaseline = "top";
  for (const instance of instances) {
    const [x1, y1] = instance.box;
    const colour = classColour(instance.label);
    const text = `${instance.label} ${formatScore(instance.score)}`;
    const width = context.measureText(text).width + 2 * pad;
    const x = Math.max(0, Math.min(x1, canvas.width - width));
    const y = y1 - height >= 0 ? y1 - height : y1; // above the box, or inside it at the top edge
    context.fillStyle = css(colour);
    context.fillRect(x, y, width, height);
    context.fillStyle = textColourOn(colour);
    context.fillText(text, x + pad, y + pad);
  }
}

// ---- input: the form, the file input, drag and drop

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const url = urlInput.value.trim();
  if (url) detect({ kind: "url", url });
  else if (fileInput.files.length) detect({ kind: "file", file: fileInput.files[0] });
  else showFailure(new RequestError("Paste an image URL or choose a file first."));
});

urlInput.addEventListener("input", () => {
  if (urlInput.value) fileInput.value = ""; // one image at a time: the URL replaces the file
});

fileInput.addEventListener("change", () => {
  if (!fileInput.files.length) return;
  urlInput.value = "";
  detect({ kind: "file", file: fileInput.files[0] });
});

// The whole window takes drops, so that a near miss does not open the file in place of the page.
window.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("over");
});
window.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) dropZone.classList.remove("over");
});
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  const files = event.dataTransfer.files;
  if (files.length) {
    fileInput.files = files;
    urlInput.value = "";
    detect({ kind: "file", file: files[0] });
    return;
  }
  const url = (event.dataTransfer.getData("text/uri-list") || event.dataTransfer.getData("text/plain"))
    .split(/\r?\n/)
    .find((line) => line && !line.startsWith("#"));
  if (url) {
    urlInput.value = url.trim();
    fileInput.value = "";
    detect({ kind: "url", url: url.trim() });
  }
});

picture.addEventListener("error", () => {
  // only a failed load of the current picture: not an error left over from the one it replaced
  if (picture.getAttribute("src") && picture.complete && picture.naturalWidth === 0) pictureFailed();
});

masksBox.addEventListener("change", () => {
  draw();
  const hasMasks = answer?.instances.some((instance) => instance.mask);
  if (masksBox.checked && answer?.instances.length && !hasMasks) {
    statusLine.textContent = "Press Detect to fetch the masks of this image.";
  }
});

new ResizeObserver(() => draw()).observe(canvas);

loadModel();
