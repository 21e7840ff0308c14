// The captioning page: send the chosen image to /predict with attention=true, show the caption and
// the alternatives, and draw the attention grid of the word under the pointer over the image.
"use strict";

(function () {
  const MAX_CANVAS_SIDE = 512;

  const dropZone = document.getElementById("drop-zone");
  const fileInput = document.getElementById("file-input");
  const statusLine = document.getElementById("status");
  const resultSection = document.getElementById("result");
  const canvas = document.getElementById("canvas");
  const context = canvas.getContext("2d");
  const imageNote = document.getElementById("image-note");
  const captionLine = document.getElementById("caption");
  const nBestList = document.getElementById("n-best-list");
  const modelLine = document.getElementById("model");
  const inputs = {
    beamSize: document.getElementById("beam-size"),
    maxLength: document.getElementById("max-length"),
    nBest: document.getElementById("n-best"),
    apiKey: document.getElementById("api-key"),
  };

  // What is on screen: the decoded picture (null when the browser cannot show the format), the
  // result for it, the word pinned by a click and the word under the pointer.
  const view = { picture: null, result: null, pinned: null, hovered: null };
  let requestNumber = 0; // a newer image makes the answers of older requests irrelevant

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  // Show the server's limits next to the options, so a person sees them before hitting a 400.
  fetch("/openapi.json")
    .then((response) => (response.ok ? response.json() : null))
    .then((document_) => {
      const options = document_ && document_.paths["/predict"].post.parameters;
      if (!options) return;
      for (const option of options) {
        const input = { beam_size: inputs.beamSize, max_length: inputs.maxLength }[option.name];
        if (input && option.schema.maximum) input.max = option.schema.maximum;
      }
    })
    .catch(() => {}); // the page works without the limits

  fileInput.addEventListener("change", () => {
    if (fileInput.files.length > 0) captionFile(fileInput.files[0]);
  });

  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) captionFile(file);
  });
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  document.addEventListener("paste", (event) => {
    const item = Array.from(event.clipboardData.items).find((entry) => entry.kind === "file");
    if (item) captionFile(item.getAsFile());
  });

  async function captionFile(file) {
    const number = ++requestNumber;
    setStatus(`Captioning ${file.name || "the image"}…`);
    const form = new FormData();
    form.append("image", file, file.name || "image");
    form.append("beam_size", inputs.beamSize.value);
    form.append("max_length", inputs.maxLength.value);
    form.append("n_best", Math.min(Number(inputs.nBest.value), Number(inputs.beamSize.value)));
    form.append("attention", "true");
    const headers = {};
    if (inputs.apiKey.value) headers.Authorization = `Bearer ${inputs.apiKey.value}`;

    const picture = loadPicture(file);
    let body;
    try {
      const response = await fetch("/predict", { method: "POST", body: form, headers });
      body = await response.json().catch(() => null);
      if (!response.ok) {
        const message = body && body.error ? body.error.message : `the server answered ${response.status}`;
        throw new Error(message);
      }
    } catch (error) {
      if (number === requestNumber) setStatus(`Could not caption the image: ${error.message}`, true);
      return;
    }
    if (number !== requestNumber) return;
    view.picture = await picture;
    view.result = body.results[0];
    view.pinned = null;
    view.hovered = null;
    setStatus("");
    showResult(body);
  }

  // Decode the file for display; resolves to null for formats the browser cannot show (e.g. TIFF).
  function loadPicture(file) {
    return new Promise((resolve) => {
      const url = URL.createObjectURL(file);
      const picture = new Image();
      // The decoded picture stays usable once the URL is revoked; keeping the URL would leak the file.
      picture.onload = () => {
        URL.revokeObjectURL(url);
        resolve(picture);
      };
      picture.onerror = () => {
        URL.revokeObjectURL(url);
        resolve(null);
      };
      picture.src = url;
    });
  }

  function showResult(body) {
    const result = view.result;
    captionLine.replaceChildren();
    result.words.forEach((word, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "word";
      button.textContent = word;
      button.dataset.index = String(index);
      button.addEventListener("mouseenter", () => setHovered(index));
      button.addEventListener("mouseleave", () => setHovered(null));
      button.addEventListener("focus", () => setHovered(index));
      button.addEventListener("blur", () => setHovered(null));
      button.addEventListener("click", () => {
        view.pinned = view.pinned === index ? null : index;
        draw();
      });
      captionLine.append(button);
      captionLine.append(" ");
    });
    nBestList.replaceChildren(
      ...result.captions.map((entry) => {
        const item = document.createElement("li");
        const text = document.createElement("span");
        text.textContent = entry.caption;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = entry.score.toFixed(3);
        item.append(text, " ", score);
        return item;
      })
    );
    modelLine.textContent = `Model ${body.model.name} ${body.model.version}, ${Math.round(body.timing_ms)} ms`;
    resultSection.hidden = false;
    imageNote.hidden = view.picture !== null;
    canvas.hidden = view.picture === null;
    draw();
  }

  function setHovered(index) {
    view.hovered = index;
    draw();
  }

  function draw() {
    const picture = view.picture;
    if (!picture) return;
    const scale = Math.min(1, MAX_CANVAS_SIDE / Math.max(picture.naturalWidth, picture.naturalHeight));
    canvas.width = Math.max(1, Math.round(picture.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(picture.naturalHeight * scale));
    context.drawImage(picture, 0, 0, canvas.width, canvas.height);
    for (const button of captionLine.querySelectorAll(".word")) {
      const index = Number(button.dataset.index);
      button.classList.toggle("active", index === view.hovered || index === view.pinned);
    }
    const index = view.hovered !== null ? view.hovered : view.pinned;
    if (index !== null) drawAttention(view.result.attention[index]);
  }

  // The grid covers the whole image (the model sees it squashed to a square, not cropped), so it is
  // stretched over the whole canvas; smoothing turns the coarse cells into soft edges. As in the
  // figures of Show, Attend and Tell, the regions the word attends to stay bright and the rest is
  // dimmed; a map with no preference (all cells equal) dims everything alike.
  function drawAttention(grid) {
    const rows = grid.length;
    const columns = grid[0].length;
    const values = grid.flat();
    const low = Math.min(...values);
    const range = Math.max(...values) - low;
    const cells = document.createElement("canvas");
    cells.width = columns;
    cells.height = rows;
    const cellContext = cells.getContext("2d");
    const pixels = cellContext.createImageData(columns, rows);
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < columns; x++) {
        const strength = range > 1e-6 ? (grid[y][x] - low) / range : 0;
        const offset = (y * columns + x) * 4;
        pixels.data[offset] = 20; // a dark blue veil over what the word does not look at
        pixels.data[offset + 1] = 24;
        pixels.data[offset + 2] = 48;
        pixels.data[offset + 3] = Math.round(190 * (1 - strength));
      }
    }
    cellContext.putImageData(pixels, 0, 0);
    context.save();
    context.imageSmoothingEnabled = true;
    context.imageSmoothingQuality = "high";
    context.drawImage(cells, 0, 0, canvas.width, canvas.height);
    context.restore();
  }
})();
