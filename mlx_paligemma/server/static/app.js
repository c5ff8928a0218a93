// The page: pick or drop an image, run a task on /v1/tasks/{task} (streamed), draw the results.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const state = { dataUrl: null, image: null, result: null, busy: false };

const TEXT_FIELD = {
  caption: null,
  answer: { label: "Question", placeholder: "what is on the table?" },
  detect: { label: "Objects", placeholder: "cat ; dog" },
  segment: { label: "Objects", placeholder: "cat" },
};

function updateForm() {
  const field = TEXT_FIELD[$("task").value];
  $("text-row").hidden = !field;
  if (field) {
    $("text-label").textContent = field.label;
    $("text").placeholder = field.placeholder;
  }
  $("run").disabled = state.busy || !state.image;
}

function loadFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) return showError(`${file.name} is not an image`);
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      state.dataUrl = reader.result;
      state.image = img;
      state.result = null;
      $("drop-hint").textContent = `${file.name} — ${img.naturalWidth}×${img.naturalHeight}. Drop another to replace it.`;
      clearOutput();
      draw();
      updateForm();
    };
    img.onerror = () => showError(`${file.name}: the browser cannot read this image`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// COCO uncompressed RLE (column-major runs, zeros first) -> alpha mask on a canvas of the image's size.
function maskCanvas(rle, colour) {
  const [h, w] = rle.size;
  const bits = new Uint8Array(h * w);
  let pos = 0;
  rle.counts.forEach((n, i) => {
    if (i % 2 === 1) bits.fill(1, pos, pos + n);
    pos += n;
  });
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  const ctx = c.getContext("2d");
  const data = ctx.createImageData(w, h);
  const [r, g, b] = [1, 3, 5].map((k) => parseInt(colour.slice(k, k + 2), 16));
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      if (!bits[x * h + y]) continue;
      const o = (y * w + x) * 4;
      data.data[o] = r; data.data[o + 1] = g; data.data[o + 2] = b; data.data[o + 3] = 110;
    }
  }
  ctx.putImageData(data, 0, 0);
  return c;
}

function objectsOf(result) {
  if (!result) return [];
  return result.detections || result.segmentations || [];
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const img = state.image;
  if (!img) return;
  const scale = Math.min(4, 640 / img.naturalWidth, 520 / img.naturalHeight); // small images shown larger
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const colourOf = {};
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 150));
  objectsOf(state.result).forEach((obj) => {
    const colour = (colourOf[obj.label] ??= COLOURS[Object.keys(colourOf).length % COLOURS.length]);
    if (obj.mask) ctx.drawImage(maskCanvas(obj.mask, colour), 0, 0, canvas.width, canvas.height);
    const [x0, y0, x1, y1] = obj.box.map((v) => v * scale);
    ctx.strokeStyle = colour;
    ctx.lineWidth = line;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    if (obj.label) {
      ctx.font = "bold 13px sans-serif";
      const w = ctx.measureText(obj.label).width + 8;
      const ty = Math.max(y0 - 18, 0);
      ctx.fillStyle = colour;
      ctx.fillRect(x0, ty, w, 18);
      ctx.fillStyle = "#fff";
      ctx.fillText(obj.label, x0 + 4, ty + 13);
    }
  });
}

function clearOutput() {
  $("answer").textContent = "";
  $("objects").innerHTML = "";
  $("speed").textContent = "";
  $("error").textContent = "";
}

function showError(message) {
  $("error").textContent = message;
}

function showResult(result) {
  state.result = result;
  $("answer").textContent = result.text;
  const list = $("objects");
  list.innerHTML = "";
  const colourOf = {};
  objectsOf(result).forEach((obj) => {
    const colour = (colourOf[obj.label] ??= COLOURS[Object.keys(colourOf).length % COLOURS.length]);
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.style.background = colour;
    li.append(swatch, `${obj.label || "(no label)"} [${obj.box.map((v) => Math.round(v)).join(", ")}]`);
    list.append(li);
  });
  if (result.task === "segment" && !result.masks && objectsOf(result).length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "boxes only: start the server with --mask-decoder to see masks";
    list.append(li);
  }
  const t = result.timings;
  $("speed").textContent =
    `prefill ${t.prompt_per_second} tok/s (${t.prompt_n} tokens) · decode ${t.predicted_per_second} tok/s ` +
    `(${t.predicted_n} tokens) · batch of ${t.batch_size}`;
  draw();
}

async function run(event) {
  event.preventDefault();
  if (!state.image || state.busy) return;
  const task = $("task").value;
  const body = {
    image: state.dataUrl,
    lang: $("lang").value.trim() || "en",
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    stream: true,
  };
  const text = $("text").value.trim();
  if (task === "answer") body.question = text;
  if (task === "detect" || task === "segment") body.labels = text;
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) {
    headers.Authorization = `Bearer ${key}`;
    localStorage.setItem("paligemma-api-key", key);
  }
  state.busy = true;
  state.result = null;
  updateForm();
  clearOutput();
  draw();
  $("answer").classList.add("streaming");
  try {
    const response = await fetch(`/v1/tasks/${task}`, { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      if (response.status === 401) $("key-box").open = true;
      return showError(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, cut).split("\n");
        buffer = buffer.slice(cut + 2);
        for (const line of lines) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const data = JSON.parse(payload);
          if (data.delta !== undefined) $("answer").textContent += data.delta;
          else if (data.result) showResult(data.result);
          else if (data.error) showError(data.error.message);
        }
      }
    }
  } catch (e) {
    showError(`request failed: ${e.message}`);
  } finally {
    state.busy = false;
    $("answer").classList.remove("streaming");
    updateForm();
  }
}

function setup() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => loadFile(e.dataTransfer.files[0]));
  drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL") $("file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
  $("task").addEventListener("change", updateForm);
  $("form").addEventListener("submit", run);
  $("api-key").value = localStorage.getItem("paligemma-api-key") || "";
  updateForm();
  fetch("/health")
    .then((r) => r.json())
    .then((h) => { $("model").textContent = `${h.model}${h.masks ? " · masks on" : ""}`; })
    .catch(() => { $("model").textContent = "server unreachable"; });
}

setup();
