// The lychee-rerank playground: plain JavaScript, no build step, no network beyond this server.
//
// Flow: files and passages are collected in the page; on Rank, images are prepared in the browser
// (GIF/BMP converted to PNG, anything over the server's max_pixels downscaled with a canvas, aspect
// ratio kept), one JSON body in the /v1/rerank shape is POSTed to /v1/rerank/progress, and the
// server-sent events of the answer (read from the fetch body: EventSource cannot POST) drive the
// progress bar until the `result` event, which is the /v1/rerank answer. A refusal that names
// documents[i] is mapped back to the file or passage it came from, shown under "Not ranked", and
// the request is sent again without it, so one bad file never fails the run.
"use strict";

(() => {
  const DEFAULT_INSTRUCTION =
    "Given a web search query, retrieve relevant passages that answer the query";
  const PRESETS = {
    web: DEFAULT_INSTRUCTION,
    image: "Given an image search query, retrieve the images that best match what it describes",
    kb:
      "Given a question, retrieve the passages, documents or screenshots from the knowledge base " +
      "that answer it",
    product:
      "Given a product search query, retrieve the product descriptions and photos that best match " +
      "what the shopper is looking for",
  };
  const TOKEN_KEY = "lychee-rerank-token";
  const PROGRESS_ROUTE = "/v1/rerank/progress";
  const PLAIN_ROUTE = "/v1/rerank";
  const TEXT_EXTENSIONS = new Set(["txt", "md", "markdown", "text", "rst", "csv", "log"]);
  const SENT_AS_IS = new Set(["jpeg", "png", "webp"]); // what the server takes
  const CONVERTED = new Set(["gif", "bmp"]); // converted to PNG here
  const SNIPPET_LINES = 6;
  const SNIPPET_CHARS = 320;

  const $ = (id) => document.getElementById(id);
  const el = {
    serverLine: $("server-line"),
    form: $("rank-form"),
    preset: $("preset"),
    instruction: $("instruction"),
    queryText: $("query-text"),
    queryDrop: $("query-drop"),
    queryPick: $("query-pick"),
    queryFile: $("query-file"),
    queryPreview: $("query-preview"),
    queryThumb: $("query-thumb"),
    queryName: $("query-name"),
    queryClear: $("query-clear"),
    docsDrop: $("docs-drop"),
    docsPick: $("docs-pick"),
    docFiles: $("doc-files"),
    fileCount: $("file-count"),
    filesClear: $("files-clear"),
    fileList: $("file-list"),
    passages: $("passages"),
    topN: $("top-n"),
    token: $("token"),
    rank: $("rank"),
    cancel: $("cancel"),
    progress: $("progress"),
    prepared: document.querySelector("#progress .progress-prepared"),
    scored: document.querySelector("#progress .progress-scored"),
    phase: $("phase"),
    live: $("live"),
    problems: $("problems"),
    problemList: $("problem-list"),
    runError: $("run-error"),
    results: $("results"),
    toolbar: $("toolbar"),
    threshold: $("threshold"),
    thresholdValue: $("threshold-value"),
    shownCount: $("shown-count"),
    downloadJson: $("download-json"),
    downloadCsv: $("download-csv"),
    resultsEmpty: $("results-empty"),
    grid: $("grid"),
    viewer: $("viewer"),
    viewerTitle: $("viewer-title"),
    viewerBody: $("viewer-body"),
    viewerClose: $("viewer-close"),
  };

  const state = {
    info: null, // GET /v1/info, once it answered
    infoError: "",
    files: [], // {id, file, name, kind, prepared, preparedFor, bad}
    queryImage: null, // {name, file, prepared, preparedFor, url}
    nextId: 1,
    running: null, // AbortController of the run in flight
    progressRoute: true, // false once the server answered 404 for it (an older server)
    run: null, // the last finished run (what the grid and the downloads show)
    downloads: [], // Blob URLs to revoke
    lastLive: 0,
    lastPhase: "",
    opener: null, // the card button that opened the viewer
  };

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
    }
  }

  class LocalBad extends Error {}

  // ------------------------------------------------------------------ small helpers
  function extension(name) {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatScore(score) {
    return Number(score).toFixed(4);
  }

  function plural(n, one, many) {
    return `${n} ${n === 1 ? one : many || one + "s"}`;
  }

  function snippet(text) {
    const lines = text.replace(/\r\n?/g, "\n").split("\n").filter((l) => l.trim() !== "");
    let out = lines.slice(0, SNIPPET_LINES).join("\n");
    if (out.length > SNIPPET_CHARS) out = out.slice(0, SNIPPET_CHARS).trimEnd() + "…";
    else if (lines.length > SNIPPET_LINES) out += "\n…";
    return out;
  }

  function node(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "className") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function headers(json) {
    const h = {};
    if (json) h["content-type"] = "application/json";
    const token = el.token.value.trim();
    if (token) h.authorization = `Bearer ${token}`;
    return h;
  }

  async function errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = { message: `HTTP ${response.status} ${response.statusText}` };
    }
    return new ApiError(response.status, body);
  }

  function describeApiError(err) {
    if (err.status === 401) {
      return el.token.value.trim()
        ? "The server refused the API token. Check it under Options."
        : "This server needs an API token: enter it under Options.";
    }
    const body = err.body || {};
    const where = (body.field_violations || [])
      .map((v) => (v.field ? `${v.field}: ${v.description}` : v.description))
      .join("; ");
    const reason = body.reason ? ` (${body.reason})` : "";
    return `${where || body.message || err.message}${reason}`;
  }

  // ------------------------------------------------------------------ server info
  async function loadInfo() {
    try {
      const response = await fetch("/v1/info", { headers: headers(false) });
      if (!response.ok) throw await errorFrom(response);
      state.info = await response.json();
      state.infoError = "";
    } catch (err) {
      state.info = null;
      state.infoError = err instanceof ApiError ? describeApiError(err) : `The server cannot be reached (${err.message}).`;
    }
    showInfo();
    return state.info;
  }

  function maxPixels() {
    const limits = state.info && state.info.limits;
    return limits && limits.max_pixels ? limits.max_pixels : null;
  }

  function showInfo() {
    el.serverLine.replaceChildren();
    if (!state.info) {
      el.serverLine.append(state.infoError || "Connecting to the server…");
      return;
    }
    const i = state.info;
    const px = maxPixels();
    el.serverLine.append(
      `Model ${i.model_id} on ${i.device} (${i.dtype}) · up to ${i.limits.max_documents} documents` +
        (px ? ` · images over ${px.toLocaleString("en")} pixels are downscaled before upload` : ""),
    );
    if (i.random_weights) {
      el.serverLine.append(" · ", node("strong", { text: "random weights: these scores carry no meaning" }));
    }
  }

  // ------------------------------------------------------------------ reading files
  async function sniff(file) {
    const head = new Uint8Array(await file.slice(0, 16).arrayBuffer());
    const ascii = (from, to) => String.fromCharCode(...head.slice(from, to));
    if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "jpeg";
    if (head[0] === 0x89 && ascii(1, 4) === "PNG") return "png";
    if (ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "webp";
    if (ascii(0, 4) === "GIF8") return "gif";
    if (ascii(0, 2) === "BM") return "bmp";
    return "";
  }

  function kindOf(file) {
    const ext = extension(file.name);
    if (file.type.startsWith("image/") || ["jpg", "jpeg", "png", "webp", "gif", "bmp"].includes(ext)) return "image";
    if (TEXT_EXTENSIONS.has(ext) || file.type.startsWith("text/")) return "text";
    return "other";
  }

  function base64Of(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const url = String(reader.result);
        resolve(url.slice(url.indexOf(",") + 1));
      };
      reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
      reader.readAsDataURL(blob);
    });
  }

  function canvasBlob(canvas, type) {
    return new Promise((resolve, reject) => {
      canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("the image could not be re-encoded"))), type, 0.9);
    });
  }

  /** The bytes to send for an image file: as is when the server takes them and they fit in
   *  max_pixels, else drawn onto a canvas (downscaled to fit, aspect ratio kept) as JPEG (for JPEG
   *  sources) or PNG. A file the browser cannot decode is sent as is when its signature is one the
   *  server takes, so the server's own reason is what the user reads. */
  async function prepareImage(file, limit) {
    const format = await sniff(file);
    if (!format) {
      throw new LocalBad("not a JPEG, PNG, WebP, GIF or BMP image (unrecognised file signature)");
    }
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(file);
    } catch (_) {
      bitmap = null;
    }
    if (!bitmap) {
      if (SENT_AS_IS.has(format)) return { blob: file, note: "" };
      throw new LocalBad(`the ${format.toUpperCase()} image could not be decoded`);
    }
    const w = bitmap.width;
    const h = bitmap.height;
    const over = limit !== null && w * h > limit;
    if (!over && SENT_AS_IS.has(format)) {
      bitmap.close();
      return { blob: file, note: `${w}×${h}` };
    }
    let nw = w;
    let nh = h;
    if (over) {
      const s = Math.sqrt(limit / (w * h));
      nw = Math.max(1, Math.floor(w * s));
      nh = Math.max(1, Math.floor(h * s));
      while (nw * nh > limit && nw > 1 && nh > 1) {
        if (nw >= nh) nw -= 1;
        else nh -= 1;
      }
    }
    const canvas = document.createElement("canvas");
    canvas.width = nw;
    canvas.height = nh;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, nw, nh);
    bitmap.close();
    const type = format === "jpeg" ? "image/jpeg" : "image/png";
    const blob = await canvasBlob(canvas, type);
    const what = [];
    if (CONVERTED.has(format)) what.push(`converted from ${format.toUpperCase()} to PNG`);
    if (over) what.push(`downscaled from ${w}×${h} to ${nw}×${nh}`);
    return { blob, note: what.join(", ") || `${nw}×${nh}` };
  }

  /** Reads (once per max_pixels) what a file entry sends: {image: base64} or {text}. */
  async function prepare(entry) {
    const limit = maxPixels();
    if (entry.prepared && entry.preparedFor === limit) return entry.prepared;
    if (entry.kind === "text") {
      const text = await entry.file.text();
      if (!text.trim()) throw new LocalBad("the file is empty");
      entry.prepared = { text, note: formatBytes(entry.file.size) };
    } else {
      const image = await prepareImage(entry.file, limit);
      if (entry.prepared && entry.prepared.url) URL.revokeObjectURL(entry.prepared.url);
      entry.prepared = {
        image: await base64Of(image.blob),
        url: URL.createObjectURL(image.blob),
        note: image.note,
        bytes: image.blob.size,
      };
    }
    entry.preparedFor = limit;
    return entry.prepared;
  }

  // ------------------------------------------------------------------ adding files
  function addFiles(list) {
    const known = new Set(state.files.map((f) => `${f.name}\u0000${f.file.size}\u0000${f.file.lastModified}`));
    for (const file of list) {
      const key = `${file.name}\u0000${file.size}\u0000${file.lastModified}`;
      if (known.has(key)) continue;
      known.add(key);
      state.files.push({
        id: state.nextId++,
        file,
        name: file.name || `pasted image ${state.nextId}.png`,
        kind: kindOf(file),
        prepared: null,
        preparedFor: undefined,
      });
    }
    renderFiles();
  }

  function removeFile(id) {
    const at = state.files.findIndex((f) => f.id === id);
    if (at < 0) return;
    const [gone] = state.files.splice(at, 1);
    if (gone.prepared && gone.prepared.url && !(state.run && state.run.urls.has(gone.prepared.url))) {
      URL.revokeObjectURL(gone.prepared.url);
    }
    renderFiles();
    const next = el.fileList.querySelectorAll("button")[Math.min(at, state.files.length - 1)];
    (next || el.docsPick).focus();
  }

  function renderFiles() {
    const images = state.files.filter((f) => f.kind === "image").length;
    const texts = state.files.filter((f) => f.kind === "text").length;
    const other = state.files.length - images - texts;
    el.fileCount.textContent = state.files.length
      ? `${plural(state.files.length, "file")}: ${plural(images, "image")}, ${plural(texts, "text file")}` +
        (other ? `, ${other} of another type (will be reported, not sent)` : "")
      : "No files yet.";
    el.filesClear.hidden = state.files.length === 0;
    el.fileList.replaceChildren(
      ...state.files.map((f) =>
        node(
          "li",
          { className: `file file-${f.kind}` },
          node("span", { className: "file-name", text: f.name, title: f.name }),
          node("span", { className: "file-kind", text: `${f.kind === "other" ? "unsupported" : f.kind} · ${formatBytes(f.file.size)}` }),
          node("button", {
            type: "button",
            className: "file-remove",
            "aria-label": `Remove ${f.name}`,
            text: "×",
            onclick: () => removeFile(f.id),
          }),
        ),
      ),
    );
  }

  function setQueryImage(file) {
    if (state.queryImage && state.queryImage.url) URL.revokeObjectURL(state.queryImage.url);
    state.queryImage = file
      ? { name: file.name || "pasted image", file, kind: "image", prepared: null, preparedFor: undefined, url: URL.createObjectURL(file) }
      : null;
    el.queryPreview.hidden = !file;
    if (file) {
      el.queryThumb.src = state.queryImage.url;
      el.queryThumb.alt = `Query image: ${state.queryImage.name}`;
      el.queryName.textContent = state.queryImage.name;
    } else {
      el.queryThumb.removeAttribute("src");
    }
  }

  function imageFiles(dataTransfer) {
    return Array.from((dataTransfer && dataTransfer.files) || []).filter((f) => f.size >= 0);
  }

  function wireDrop(zone, onFiles) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      e.stopPropagation();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      zone.classList.remove("dragging");
      onFiles(imageFiles(e.dataTransfer));
    });
  }

  // ------------------------------------------------------------------ the progress stream
  /** Server-sent events from a fetch body: yields {event, data} per dispatched event. */
  async function* readEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        const ready = [];
        for (;;) {
          const m = /\r\n|\r|\n/.exec(buffer);
          if (!m || (m[0] === "\r" && m.index === buffer.length - 1 && !done)) break; // "\r" may precede "\n"
          const line = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          if (line === "") {
            if (data.length) ready.push({ event: event || "message", data: data.join("\n") });
            event = "";
            data = [];
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let v = colon < 0 ? "" : line.slice(colon + 1);
            if (v.startsWith(" ")) v = v.slice(1);
            if (field === "event") event = v;
            else if (field === "data") data.push(v);
          }
        }
        yield* ready;
        if (done) {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          return;
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  async function post(route, body, signal) {
    const h = headers(true);
    if (route === PROGRESS_ROUTE) h.accept = "text/event-stream";
    return fetch(route, { method: "POST", headers: h, body, signal });
  }

  /** One request: the /v1/rerank answer, with progress reported to onProgress on the way. */
  async function send(body, onProgress, signal) {
    let response = null;
    if (state.progressRoute) {
      response = await post(PROGRESS_ROUTE, body, signal);
      if (response.status === 404 || response.status === 405) {
        state.progressRoute = false; // an older server: no progress stream
        response = null;
      }
    }
    if (!response) {
      onProgress(null);
      response = await post(PLAIN_ROUTE, body, signal);
    }
    if (!response.ok) throw await errorFrom(response);
    if (!(response.headers.get("content-type") || "").includes("text/event-stream")) {
      return response.json();
    }
    for await (const ev of readEvents(response.body)) {
      if (ev.event === "progress") onProgress(JSON.parse(ev.data));
      else if (ev.event === "result") return JSON.parse(ev.data);
      else if (ev.event === "error") throw new ApiError(0, JSON.parse(ev.data));
    }
    throw new Error("the server closed the progress stream before sending the result");
  }

  // ------------------------------------------------------------------ progress display
  function announce(text, force) {
    const now = Date.now();
    if (force || now - state.lastLive > 2000) {
      el.live.textContent = text;
      state.lastLive = now;
    }
  }

  function setBar(done, prepared, total, text) {
    const max = Math.max(total, 1);
    el.progress.setAttribute("aria-valuemax", String(max));
    el.progress.setAttribute("aria-valuenow", String(done));
    el.progress.setAttribute("aria-valuetext", text);
    el.scored.style.width = `${(100 * Math.min(done, max)) / max}%`;
    el.prepared.style.width = `${(100 * Math.min(prepared, max)) / max}%`;
    el.phase.textContent = text;
  }

  function showProgress(p) {
    el.progress.classList.toggle("indeterminate", p === null);
    if (p === null) {
      setBar(0, 0, 1, "Scoring… (this server does not report progress)");
      announce("Scoring", true);
      return;
    }
    const total = p.pairs_total || 0;
    const texts = {
      queued: `Queued: waiting for the model (${total} pairs)`,
      preparing: `Preparing: ${p.pairs_prepared} of ${total} documents ready, ${p.pairs_scored} scored`,
      scoring: `Scoring: ${p.pairs_scored} of ${total} pairs`,
      done: `Done: ${total} of ${total} pairs scored`,
    };
    const text = texts[p.phase] || `${p.pairs_scored} of ${total} pairs scored`;
    setBar(p.pairs_scored, p.pairs_prepared, total, text);
    announce(text, p.phase !== state.lastPhase);
    state.lastPhase = p.phase;
  }

  function showProblems(problems) {
    el.problems.hidden = problems.length === 0;
    el.problemList.replaceChildren(
      ...problems.map((p) =>
        node("li", { className: "problem" }, node("strong", { className: "problem-name", text: p.name }), ": ", node("span", { className: "problem-reason", text: p.reason })),
      ),
    );
  }

  function showError(text) {
    el.runError.hidden = !text;
    el.runError.textContent = text || "";
  }

  // ------------------------------------------------------------------ a run
  const DOC_FIELD = /^documents\[(\d+)\]/;
  const DOC_MENTION = /documents\[\d+\](\.[\w.[\]]+)?/g;

  /** index -> reason when every violation is about one of the documents sent, else null. */
  function documentProblems(body, count) {
    const violations = (body && body.field_violations) || [];
    if (!violations.length) return null;
    const out = new Map();
    for (const v of violations) {
      const m = DOC_FIELD.exec(v.field || "");
      if (!m || Number(m[1]) >= count) return null;
      const i = Number(m[1]);
      const text = (v.description || body.message || "refused").replace(DOC_MENTION, "this document");
      const reason = v.reason ? `${text} (${v.reason})` : text;
      out.set(i, out.has(i) ? `${out.get(i)}; ${reason}` : reason);
    }
    return out;
  }

  function passageBlocks() {
    return el.passages.value
      .split(/\r?\n[ \t]*\r?\n/)
      .map((b) => b.trim())
      .filter((b) => b !== "")
      .map((text, i) => ({ name: `passage ${i + 1}`, kind: "text", prepared: { text, note: "pasted" } }));
  }

  function setRunning(controller) {
    state.running = controller;
    el.rank.disabled = controller !== null;
    el.cancel.hidden = controller === null;
    el.form.setAttribute("aria-busy", controller ? "true" : "false");
  }

  async function rank() {
    if (state.running) return;
    showError("");
    const instruction = el.instruction.value.trim();
    const queryText = el.queryText.value.trim();
    if (!queryText && !state.queryImage) {
      showError("Type a query or add a query image.");
      el.queryText.focus();
      return;
    }
    const topRaw = el.topN.value.trim();
    const topN = topRaw === "" ? null : Number(topRaw);
    if (topN !== null && !(Number.isInteger(topN) && topN >= 1)) {
      showError("“Show the best” must be a whole number of at least 1, or empty for all.");
      el.topN.focus();
      return;
    }
    const controller = new AbortController();
    setRunning(controller);
    state.lastPhase = "";
    el.progress.classList.remove("indeterminate");
    const problems = [];
    showProblems(problems);
    try {
      if (!state.info) await loadInfo();
      if (!state.info && /token/.test(state.infoError)) throw new Error(state.infoError);

      let query = queryText;
      if (state.queryImage) {
        setBar(0, 0, 1, "Preparing the query image…");
        try {
          const prepared = await prepare(state.queryImage);
          query = queryText ? { text: queryText, image: prepared.image } : { image: prepared.image };
        } catch (err) {
          throw new Error(`The query image ${state.queryImage.name} cannot be used: ${err.message}`);
        }
      }

      const candidates = [];
      const files = state.files.slice();
      for (let i = 0; i < files.length; i += 1) {
        const entry = files[i];
        setBar(0, 0, 1, `Preparing files in the browser: ${i + 1} of ${files.length}`);
        if (controller.signal.aborted) throw new DOMException("cancelled", "AbortError");
        if (entry.kind === "other") {
          problems.push({ name: entry.name, reason: "unsupported file type (images: JPEG, PNG, WebP, GIF, BMP; text: .txt, .md)" });
          continue;
        }
        try {
          await prepare(entry);
          candidates.push(entry);
        } catch (err) {
          problems.push({ name: entry.name, reason: err instanceof LocalBad ? err.message : `cannot be read: ${err.message}` });
        }
      }
      candidates.push(...passageBlocks());
      showProblems(problems);
      if (!candidates.length) {
        throw new Error(problems.length ? "None of the documents can be ranked." : "Add documents (files or passages) to rank.");
      }
      const limit = state.info && state.info.limits.max_documents;
      if (limit && candidates.length > limit) {
        throw new Error(`This server ranks at most ${limit} documents per request; remove ${candidates.length - limit}.`);
      }

      let sent = candidates;
      let answer = null;
      while (sent.length) {
        const payload = { query, documents: sent.map((d) => (d.prepared.image !== undefined ? { image: d.prepared.image } : { text: d.prepared.text })) };
        if (instruction) payload.instruction = instruction;
        if (topN !== null) payload.top_n = topN;
        const body = JSON.stringify(payload);
        setBar(0, 0, sent.length, `Sending ${plural(sent.length, "document")} (${formatBytes(body.length)})…`);
        try {
          answer = await send(body, showProgress, controller.signal);
          break;
        } catch (err) {
          const bad = err instanceof ApiError ? documentProblems(err.body, sent.length) : null;
          if (!bad) throw err;
          const names = [];
          for (const [i, reason] of [...bad.entries()].sort((a, b) => a[0] - b[0])) {
            problems.push({ name: sent[i].name, reason });
            names.push(sent[i].name);
          }
          sent = sent.filter((_, i) => !bad.has(i));
          showProblems(problems);
          announce(`${names.join(", ")} could not be ranked; ranking the other ${plural(sent.length, "document")}.`, true);
        }
      }
      if (!answer) throw new Error("None of the documents can be ranked.");
      finish(answer, sent, problems, { instruction: instruction || DEFAULT_INSTRUCTION, queryText, queryImage: state.queryImage && state.queryImage.name });
    } catch (err) {
      if (err && err.name === "AbortError") {
        setBar(0, 0, 1, "Cancelled.");
        announce("Cancelled", true);
      } else {
        let text = err instanceof ApiError ? describeApiError(err) : err.message;
        if (err instanceof TypeError && /fetch|network/i.test(err.message)) {
          text = `The server cannot be reached (${err.message}).`;
        }
        showError(text);
        setBar(0, 0, 1, "The run failed.");
        if (err instanceof ApiError && err.status === 401) el.token.focus();
      }
    } finally {
      setRunning(null);
    }
  }

  function finish(answer, sent, problems, ask) {
    const ranked = answer.results.map((r, i) => {
      const doc = sent[r.index];
      return {
        rank: i + 1,
        score: r.relevance_score,
        name: doc.name,
        kind: doc.prepared.image !== undefined ? "image" : "text",
        url: doc.prepared.url || null,
        text: doc.prepared.text === undefined ? null : doc.prepared.text,
        note: doc.prepared.note || "",
        truncated: Boolean(r.truncated),
      };
    });
    const urls = new Set(ranked.map((r) => r.url).filter(Boolean));
    state.run = { answer, ranked, problems, ask, urls, pairs: sent.length };
    const total = sent.length;
    setBar(total, total, total, `Done: ${plural(ranked.length, "result")} from ${plural(total, "document")}` + (problems.length ? `, ${problems.length} not ranked` : ""));
    announce(el.phase.textContent, true);
    renderResults();
  }

  // ------------------------------------------------------------------ results
  function card(r) {
    const visual = r.kind === "image"
      ? node("span", { className: "card-visual" }, node("img", { src: r.url, alt: r.name, loading: "lazy", decoding: "async" }))
      : node("span", { className: "card-visual card-snippet", text: snippet(r.text) });
    const pct = Math.max(0, Math.min(1, r.score)) * 100;
    const label = `Rank ${r.rank}: ${r.name}, score ${formatScore(r.score)}. Enlarge.`;
    return node(
      "li",
      { className: `card card-${r.kind}`, "data-rank": r.rank, "data-score": r.score, "data-name": r.name },
      node(
        "button",
        { type: "button", className: "card-open", "aria-label": label, onclick: (e) => openViewer(r, e.currentTarget) },
        node("span", { className: "card-rank", text: `#${r.rank}` }),
        visual,
      ),
      node(
        "div",
        { className: "card-meta" },
        node("span", { className: "card-name", text: r.name, title: r.name }),
        node(
          "span",
          { className: "card-score" },
          node("span", { className: "score-bar", "aria-hidden": "true" }, node("span", { style: `width: ${pct.toFixed(1)}%` })),
          node("span", { className: "score-num", text: formatScore(r.score) }),
        ),
      ),
    );
  }

  function renderResults() {
    const run = state.run;
    el.grid.replaceChildren(...run.ranked.map(card));
    el.toolbar.hidden = false;
    el.resultsEmpty.hidden = run.ranked.length > 0;
    el.resultsEmpty.textContent = run.ranked.length ? "" : "Nothing was ranked.";
    applyThreshold();
    updateDownloads();
  }

  function applyThreshold() {
    const t = Number(el.threshold.value);
    el.thresholdValue.value = t.toFixed(2);
    el.thresholdValue.textContent = t.toFixed(2);
    if (!state.run) return;
    let shown = 0;
    for (const li of el.grid.children) {
      const hide = Number(li.dataset.score) < t;
      li.hidden = hide;
      if (!hide) shown += 1;
    }
    el.shownCount.textContent = `showing ${shown} of ${state.run.ranked.length}`;
  }

  function runRecord() {
    const run = state.run;
    return {
      model: run.answer.model,
      request_id: run.answer.id,
      random_weights: Boolean(state.info && state.info.random_weights),
      instruction: run.ask.instruction,
      query: { text: run.ask.queryText || null, image: run.ask.queryImage || null },
      results: run.ranked.map((r) => {
        const out = { rank: r.rank, score: r.score, name: r.name, kind: r.kind };
        if (r.truncated) out.truncated = true;
        return out;
      }),
      not_ranked: run.problems.map((p) => ({ name: p.name, reason: p.reason })),
    };
  }

  function csvCell(value) {
    let s = String(value);
    if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // keep spreadsheets from running a name as a formula
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function updateDownloads() {
    for (const url of state.downloads) URL.revokeObjectURL(url);
    const record = runRecord();
    const json = new Blob([JSON.stringify(record, null, 2) + "\n"], { type: "application/json" });
    const rows = [["rank", "score", "name", "kind"], ...record.results.map((r) => [r.rank, r.score, r.name, r.kind])];
    const csv = new Blob([rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n"], { type: "text/csv" });
    const jsonUrl = URL.createObjectURL(json);
    const csvUrl = URL.createObjectURL(csv);
    state.downloads = [jsonUrl, csvUrl];
    el.downloadJson.href = jsonUrl;
    el.downloadCsv.href = csvUrl;
  }

  function openViewer(r, opener) {
    state.opener = opener;
    el.viewerTitle.textContent = `#${r.rank} · ${r.name} · ${formatScore(r.score)}`;
    const note = [r.note, r.truncated ? "cut to fit max_length" : ""].filter(Boolean).join(" · ");
    el.viewerBody.replaceChildren(
      r.kind === "image" ? node("img", { src: r.url, alt: r.name }) : node("pre", { className: "viewer-text", text: r.text }),
      note ? node("p", { className: "help", text: note }) : null,
    );
    el.viewer.showModal();
    el.viewerClose.focus();
  }

  // ------------------------------------------------------------------ wiring
  function presetFor(text) {
    for (const [key, value] of Object.entries(PRESETS)) if (value === text.trim()) return key;
    return "custom";
  }

  el.preset.addEventListener("change", () => {
    if (PRESETS[el.preset.value]) el.instruction.value = PRESETS[el.preset.value];
  });
  el.instruction.addEventListener("input", () => {
    el.preset.value = presetFor(el.instruction.value);
  });

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    rank();
  });
  el.cancel.addEventListener("click", () => state.running && state.running.abort());
  for (const area of [el.instruction, el.queryText, el.passages]) {
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        el.form.requestSubmit();
      }
    });
  }

  el.queryPick.addEventListener("click", () => el.queryFile.click());
  el.queryFile.addEventListener("change", () => {
    if (el.queryFile.files.length) setQueryImage(el.queryFile.files[0]);
    el.queryFile.value = "";
  });
  el.queryClear.addEventListener("click", () => {
    setQueryImage(null);
    el.queryPick.focus();
  });
  el.docsPick.addEventListener("click", () => el.docFiles.click());
  el.docFiles.addEventListener("change", () => {
    addFiles(Array.from(el.docFiles.files));
    el.docFiles.value = "";
  });
  el.filesClear.addEventListener("click", () => {
    state.files = [];
    renderFiles();
    el.docsPick.focus();
  });
  for (const [zone, pick] of [[el.queryDrop, el.queryPick], [el.docsDrop, el.docsPick]]) {
    zone.addEventListener("keydown", (e) => {
      if (e.target === zone && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        pick.click();
      }
    });
  }
  wireDrop(el.queryDrop, (files) => {
    const image = files.find((f) => kindOf(f) === "image");
    if (image) setQueryImage(image);
  });
  wireDrop(el.docsDrop, addFiles);
  // Files dropped anywhere else become documents instead of replacing the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    addFiles(imageFiles(e.dataTransfer));
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (!files.length) return; // text pastes go where they were typed
    e.preventDefault();
    const inQuery = e.target instanceof Node && el.queryDrop.closest("section").contains(e.target);
    if (inQuery) {
      const image = files.find((f) => kindOf(f) === "image");
      if (image) setQueryImage(image);
    } else {
      addFiles(files);
    }
  });

  el.threshold.addEventListener("input", applyThreshold);
  el.viewerClose.addEventListener("click", () => el.viewer.close());
  el.viewer.addEventListener("click", (e) => {
    if (e.target === el.viewer) el.viewer.close(); // a click on the backdrop
  });
  el.viewer.addEventListener("close", () => {
    if (state.opener && document.contains(state.opener)) state.opener.focus();
  });

  el.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  let tokenTimer = 0;
  el.token.addEventListener("input", () => {
    const token = el.token.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(tokenTimer);
    tokenTimer = setTimeout(loadInfo, 400);
  });

  el.preset.value = presetFor(el.instruction.value);
  renderFiles();
  loadInfo();
})();
