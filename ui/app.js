// The comfymgr dashboard: one page over the keyed API.
//
// The API key is asked for once and kept in sessionStorage (this tab only);
// it goes out as X-API-Key, and as ?api_key= on the event stream, whose
// browser WebSocket cannot set headers. The event stream keeps the page live:
// progress moves the bars at once, a lifecycle event reloads the job lists
// (at most one reload every REFRESH_GAP ms), a preview event fetches the new
// preview image. Backends and GPUs come from /v1/status every STATUS_EVERY ms.
// Only the lists an event can have changed are reloaded, to stay well inside
// comfymgr's rate limit (COMFYMGR_RATE_LIMIT, per client address).
// After a reconnect the stream resumes with `since` = the last seq seen.
//
// Everything a job or a server says is put into the page as text
// (textContent), never as HTML; images are fetched with the key and shown
// through blob: URLs.
"use strict";

(() => {
  const KEY_STORE = "comfymgr.apiKey";
  const STATUS_EVERY = 5000;   // ms between two reads of /v1/status
  const REFRESH_GAP = 2000;    // least ms between two reloads of the job lists
  const PREVIEW_GAP = 1500;    // least ms between two preview downloads, all jobs together
  const PAGE = 6;              // jobs per page of the completed and failed lists
  const LIST_LIMIT = 500;      // the API's largest page
  const THUMBS_PER_JOB = 4;
  const MAX_FILE = 64 * 1024 * 1024;
  const IMAGE_FILE = /\.(png|jpe?g|webp|gif|bmp|avif)$/i;
  const PRIORITIES = ["high", "normal", "low"];
  const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];

  const $ = (id) => document.getElementById(id);

  let key = null;
  let session = 0;            // bumped on sign-out: answers of an older session are dropped
  let offset = 0;             // the server's clock minus this browser's, in ms
  let status = null;
  let running = [];
  let queued = [];
  let queueTruncated = false;
  // The paged lists of finished jobs: cursors[i] opens page i (null: the newest).
  const pages = {
    done: { status: "completed", cursors: [null], page: 0, next: null },
    problems: { status: "failed", cursors: [null], page: 0, next: null },
  };
  const ALL_LISTS = ["running", "queued", "done", "problems"];
  // What an event may have changed, hence which lists it reloads.
  const CHANGES = {
    "workflow:queued": ["queued"],
    "workflow:started": ["running", "queued"],
    "workflow:completed": ["running", "done"],
    "workflow:error": ["running", "queued", "problems"],
    "workflow:cancelled": ["running", "queued", "problems"],
  };
  const stale = new Set();    // lists to reload at the next refresh
  let socket = null;
  let lastSeq = null;
  let retries = 0;
  const timers = { reconnect: null, status: null, tick: null, refresh: null, preview: null, notice: null };
  let refreshAt = 0;
  let refreshing = false;
  let refreshAgain = false;
  let pausedUntil = 0;        // after a 429: no requests until then
  const previews = new Map(); // job id -> {counter, fetched, fetchedAt, path, url}
  let previewBusy = false;
  let previewLast = 0;
  const thumbs = new Map();   // output URL -> Promise of an object URL (null: not shown)
  let chosen = null;          // the workflow picked for submission: {name, workflow}

  // -- the API ----------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && typeof body.message === "string" && body.message) || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
    }
  }

  async function api(path, { method = "GET", body, raw = false } = {}) {
    const mine = session;
    if (Date.now() < pausedUntil) throw new ApiError(429, { message: "paused after a 429" });
    const headers = { "X-API-Key": key };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", redirect: "error",
    });
    if (mine !== session) throw new ApiError(0, { message: "signed out" });
    if (resp.status === 401) {
      signOut("The API key was not accepted. Enter it again.");
      throw new ApiError(401, await readJson(resp));
    }
    if (resp.status === 429) {
      const wait = Math.max(1, Number(resp.headers.get("Retry-After")) || 5);
      pausedUntil = Date.now() + wait * 1000;
      notice(`comfymgr's rate limit was reached: paused for ${wait} s (see COMFYMGR_RATE_LIMIT).`);
    }
    if (raw && resp.ok) return resp;
    const data = await readJson(resp);
    if (!resp.ok) throw new ApiError(resp.status, data);
    return data;
  }

  async function readJson(resp) {
    try {
      return await resp.json();
    } catch {
      return null;
    }
  }

  const jobPath = (id) => `/v1/comfyui/workflow/${encodeURIComponent(id)}`;

  // A same-origin path for a URL the API gave, or null: the key goes nowhere else.
  function ownPath(url) {
    try {
      const u = new URL(url, location.href);
      return u.origin === location.origin ? u.pathname + u.search : null;
    } catch {
      return null;
    }
  }

  // -- signing in and out -----------------------------------------------------

  async function start(given) {
    key = given;
    retries = 0;
    const mine = ++session;
    $("key-message").textContent = "Connecting…";
    let first;
    try {
      first = await api("/v1/status");
    } catch (err) {
      if (err.status !== 401 && mine === session) showLogin(`comfymgr did not answer: ${err.message}`);
      return;
    }
    sessionStorage.setItem(KEY_STORE, given);
    $("login").hidden = true;
    $("dash").hidden = false;
    $("forget").hidden = false;
    $("key").value = "";
    $("key-message").textContent = "";
    onStatus(first);
    lastSeq = first.stream && Number.isInteger(first.stream.latestSeq) ? first.stream.latestSeq : null;
    connect();
    scheduleRefresh(ALL_LISTS);
    timers.status = setInterval(pollStatus, STATUS_EVERY);
    timers.tick = setInterval(tick, 1000);
  }

  function signOut(message) {
    session++;
    key = null;
    sessionStorage.removeItem(KEY_STORE);
    if (socket) {
      socket.onclose = null;
      socket.close(1000);
      socket = null;
    }
    for (const name of Object.keys(timers)) {
      clearTimeout(timers[name]);
      clearInterval(timers[name]);
      timers[name] = null;
    }
    for (const p of previews.values()) if (p.url) URL.revokeObjectURL(p.url);
    previews.clear();
    pruneThumbs();
    status = null;
    running = [];
    queued = [];
    for (const list of Object.values(pages)) Object.assign(list, { cursors: [null], page: 0, next: null });
    stale.clear();
    for (const id of ["backends", "running", "queue", "done", "problems"]) $(id).replaceChildren();
    $("summary").textContent = "";
    setConn("off", "not connected");
    showLogin(message);
  }

  function showLogin(message) {
    $("dash").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("key-message").textContent = message || "";
    $("key").focus();
  }

  // -- the event stream -------------------------------------------------------

  function connect() {
    const mine = session;
    const params = new URLSearchParams({ api_key: key });
    if (lastSeq !== null) params.set("since", String(lastSeq));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/v1/comfyui/stream?${params}`);
    socket = ws;
    setConn("connecting", "connecting…");
    ws.onopen = () => {
      retries = 0;
      setConn("live", "live");
      scheduleRefresh(ALL_LISTS);  // whatever happened while the stream was away
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message && typeof message === "object" && typeof message.type === "string") onMessage(message);
    };
    ws.onclose = () => {
      if (mine !== session || socket !== ws) return;
      socket = null;
      setConn("down", "reconnecting…");
      const delay = Math.min(30000, 1000 * 2 ** retries) * (0.5 + Math.random() / 2);
      retries++;
      timers.reconnect = setTimeout(reconnect, delay);
    };
  }

  async function reconnect() {
    const mine = session;
    if (retries > 2) {
      // Failing again and again: a revoked key would look the same; ask once.
      try {
        await api("/v1/status");
      } catch (err) {
        if (err.status === 401) return;
      }
    }
    if (mine === session) connect();
  }

  function onMessage(message) {
    if (message.type.startsWith("workflow:") && Number.isInteger(message.seq)) {
      lastSeq = Math.max(lastSeq ?? 0, message.seq);
    }
    if (message.type === "workflow:progress") onProgress(message);
    else if (message.type === "workflow:preview") onPreview(message);
    else if (message.type in CHANGES) {
      onEnded(message);
      scheduleRefresh(CHANGES[message.type]);
    } else if (message.type === "error") {
      scheduleRefresh(ALL_LISTS);  // e.g. since_expired: events are gone; the lists are the truth
    }
  }

  function onProgress(message) {
    const job = running.find((j) => j.workflowId === message.workflowId);
    if (!job) {
      scheduleRefresh(["running"]);
      return;
    }
    if (typeof message.progress === "number") job.progress = message.progress;
    if ("currentNode" in message) job.currentNode = message.currentNode;
    const card = findCard($("running"), job.workflowId);
    if (card) fillRunning(card, job);
  }

  function onEnded(message) {
    const job = running.find((j) => j.workflowId === message.workflowId);
    if (!job || !["completed", "failed", "cancelled"].includes(message.status)) return;
    job.status = message.status;
    if (job.status === "completed") job.progress = 100;
    const card = findCard($("running"), job.workflowId);
    if (card) fillRunning(card, job);
  }

  // -- reloading the lists ----------------------------------------------------

  function scheduleRefresh(lists) {
    for (const list of lists) stale.add(list);
    if (timers.refresh || key === null) return;
    const wait = Math.max(0, refreshAt + REFRESH_GAP - Date.now());
    timers.refresh = setTimeout(() => {
      timers.refresh = null;
      refresh();
    }, wait);
  }

  async function refresh() {
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    refreshAt = Date.now();
    const mine = session;
    const wanted = [...stale].filter((list) => !(list in pages) || pages[list].page === 0);
    stale.clear();
    try {
      const answers = await Promise.all(wanted.map((list) => api(list in pages ? pagePath(list)
        : `/v1/comfyui/workflows?status=${list}&limit=${LIST_LIMIT}`)));
      if (mine !== session) return;
      wanted.forEach((list, i) => {
        if (list === "running") {
          running = answers[i].workflows;
          running.sort((a, b) => String(a.backend).localeCompare(String(b.backend)));
        } else if (list === "queued") {
          queued = answers[i].workflows;
          queueTruncated = answers[i].next !== null;
        } else showPage(list, answers[i]);
      });
      if (wanted.includes("running")) {
        renderRunning();
        renderBackends();
      }
      if (wanted.includes("queued")) renderQueue();
    } catch (err) {
      // Kept stale: the next event, or the stream's next (re)connect, reloads them.
      if (mine === session && err.status !== 401) {
        for (const list of wanted) stale.add(list);
        if (err.status === 429) refreshAt = pausedUntil;
        else notice(`Could not load the jobs: ${err.message}`);
      }
    } finally {
      refreshing = false;
      if (refreshAgain || (mine === session && refreshAt > Date.now())) {
        refreshAgain = false;
        scheduleRefresh([]);
      }
    }
  }

  async function pollStatus() {
    if (document.hidden) return;  // nobody looking: save the rate limit's budget
    try {
      onStatus(await api("/v1/status"));
    } catch (err) {
      if (err.status !== 401 && err.status !== 429) notice(`Could not read the status: ${err.message}`);
    }
  }

  function onStatus(value) {
    status = value;
    if (Number.isFinite(value.startedAt) && Number.isFinite(value.uptimeSeconds)) {
      offset = value.startedAt + value.uptimeSeconds * 1000 - Date.now();
    }
    const counts = (value.queue && value.queue.byStatus) || {};
    $("summary").textContent = STATUSES.map((s) => `${counts[s] ?? 0} ${s}`).join(" · ");
    renderBackends();
    renderQueueNote();
  }

  // -- backends ---------------------------------------------------------------

  function renderBackends() {
    if (!status) return;
    if (!Array.isArray(status.backends)) {
      // A client key's status holds its own queue only, nothing of the box.
      const note = document.createElement("p");
      note.className = "empty";
      note.textContent = typeof status.key === "string"
        ? `Signed in with the client key "${status.key}": its own jobs are shown, not the backends and GPUs.`
        : "No backends reported.";
      $("backends").replaceChildren(note);
      return;
    }
    const gpus = (status.gpu && status.gpu.devices) || [];
    const cards = (status.backends || []).map((b) => {
      const card = clone("t-backend");
      card.dataset.name = b.name;
      card.dataset.state = b.state;
      set(card, "name", b.name);
      set(card, "state", b.state);
      field(card, "state").classList.add(b.state === "up" ? "ok" : "bad");
      set(card, "version", b.comfyuiVersion ? `ComfyUI ${b.comfyuiVersion}` : "ComfyUI version unknown");
      const nvml = gpus.find((d) => d.index === b.gpu && b.gpu !== null) ||
        gpus.find((d) => Array.isArray(d.backends) && d.backends.includes(b.name));
      const device = (b.devices || [])[0];
      if (nvml) {
        set(card, "gpu", nvml.name || `GPU ${nvml.index}`);
        meter(card, "util", nvml.utilization, nvml.utilization == null ? "n/a" : `${Math.round(nvml.utilization)} %`);
        const used = nvml.memoryUsedBytes;
        const total = nvml.memoryTotalBytes;
        meter(card, "vram", total ? (100 * used) / total : null,
          total ? `${gib(used)} / ${gib(total)} GiB` : "n/a");
        set(card, "temp", nvml.temperatureCelsius == null ? "temperature n/a"
          : `${Math.round(nvml.temperatureCelsius)} °C`);
        if (nvml.error) set(card, "error", `GPU: ${nvml.error}`);
      } else {
        // No NVML figures for it: what ComfyUI itself reports about its device.
        set(card, "gpu", device ? String(device.name) : "no device reported");
        meter(card, "util", null, "n/a");
        const total = device && Number(device.vram_total);
        const free = device && Number(device.vram_free);
        meter(card, "vram", total ? (100 * (total - free)) / total : null,
          total ? `${gib(total - free)} / ${gib(total)} GiB` : "n/a");
        set(card, "temp", status.gpu && status.gpu.reason ? `no GPU figures: ${status.gpu.reason}` : "");
      }
      const job = running.find((j) => j.backend === b.name);
      set(card, "job", job ? job.workflowId : b.runningJob || "nothing");
      if (b.state !== "up" && b.lastError) set(card, "error", b.lastError);
      return card;
    });
    $("backends").replaceChildren(...cards);
  }

  function meter(card, name, percent, text) {
    const bar = field(card, `${name}-bar`);
    const value = Number.isFinite(percent) ? Math.max(0, Math.min(100, percent)) : 0;
    bar.style.width = `${value}%`;
    bar.classList.toggle("hot", value >= 90);
    set(card, name, text);
  }

  // -- running jobs -----------------------------------------------------------

  function renderRunning() {
    const box = $("running");
    const cards = running.map((job) => {
      const card = findCard(box, job.workflowId) || newRunningCard(job);
      fillRunning(card, job);
      return card;
    });
    box.replaceChildren(...cards);
    $("running-empty").hidden = running.length > 0;
    for (const [id, p] of previews) {
      if (!running.some((j) => j.workflowId === id)) {
        if (p.url) URL.revokeObjectURL(p.url);
        previews.delete(id);
      }
    }
    pumpPreviews();
  }

  function newRunningCard(job) {
    const card = clone("t-running");
    card.dataset.id = job.workflowId;
    set(card, "id", job.workflowId);
    cancelButton(field(card, "cancel"), job.workflowId);
    return card;
  }

  function fillRunning(card, job) {
    set(card, "priority", job.priority);
    progress(card, job.progress);
    set(card, "node", job.currentNode ? `node ${job.currentNode}` : "starting");
    set(card, "backend", (job.backend || "") + by(job));
    const elapsed = field(card, "elapsed");
    if (job.startTime) elapsed.dataset.since = String(job.startTime);
    elapsed.textContent = job.startTime ? duration(now() - job.startTime) : "";
    card.dataset.status = job.status;
    if (job.status !== "running") {
      set(card, "priority", job.status);
      field(card, "cancel").disabled = true;
    } else if (job.cancelRequested) {
      Object.assign(field(card, "cancel"), { disabled: true, textContent: "Cancelling…" });
    }
    showPreview(card, job.workflowId);
  }

  function showPreview(card, id) {
    const p = previews.get(id);
    if (!p || !p.url) return;
    const img = field(card, "preview-img");
    if (img.src !== p.url) img.src = p.url;
    field(card, "preview").hidden = false;
  }

  function progress(card, value) {
    const v = Number.isFinite(value) ? Math.max(0, Math.min(100, value)) : 0;
    const bar = field(card, "progress");
    bar.setAttribute("aria-valuenow", String(v));
    field(card, "progress-bar").style.width = `${v}%`;
    set(card, "progress-text", `${Math.round(v)} %`);
  }

  // -- live previews ----------------------------------------------------------

  function onPreview(message) {
    const id = message.workflowId;
    if (typeof id !== "string") return;
    const p = previews.get(id) || { counter: -1, fetched: -1, fetchedAt: 0, path: null, url: null };
    const counter = Number(message.counter);
    p.counter = Number.isFinite(counter) ? Math.max(p.counter, counter) : p.counter + 1;
    if (typeof message.url === "string") p.path = ownPath(message.url);
    previews.set(id, p);
    pumpPreviews();
  }

  // One download at a time, at most one per PREVIEW_GAP, the job served
  // longest ago first; none while the tab is hidden. Only for jobs shown as
  // running: comfymgr drops a job's preview when it ends (then 404).
  function pumpPreviews() {
    if (previewBusy || timers.preview || document.hidden || key === null) return;
    let due = null;
    for (const entry of previews) {
      const [id, p] = entry;
      if (p.counter <= p.fetched || !running.some((j) => j.workflowId === id && j.status === "running")) continue;
      if (!due || p.fetchedAt < due[1].fetchedAt) due = entry;
    }
    if (!due) return;
    const wait = previewLast + PREVIEW_GAP - Date.now();
    if (wait > 0) {
      timers.preview = setTimeout(() => {
        timers.preview = null;
        pumpPreviews();
      }, wait);
      return;
    }
    fetchPreview(due[0], due[1]);
  }

  async function fetchPreview(id, p) {
    previewBusy = true;
    previewLast = Date.now();
    const counter = p.counter;
    p.fetched = counter;
    p.fetchedAt = previewLast;
    try {
      const resp = await api(p.path || `${jobPath(id)}/preview`, { raw: true });
      const blob = await resp.blob();
      if (previews.get(id) !== p) return;  // the job ended meanwhile
      if (p.url) URL.revokeObjectURL(p.url);
      p.url = URL.createObjectURL(blob);
      const card = findCard($("running"), id);
      if (card) showPreview(card, id);
    } catch {
      // 404 no_preview: the job moved on between the message and the download.
    } finally {
      previewBusy = false;
      pumpPreviews();
    }
  }

  // -- the queue --------------------------------------------------------------

  function renderQueue() {
    const box = $("queue");
    const old = new Map([...box.querySelectorAll("li[data-id]")].map((li) => [li.dataset.id, li]));
    const groups = [];
    for (const priority of PRIORITIES) {
      const jobs = queued.filter((j) => j.priority === priority)
        .sort((a, b) => (a.queuePosition ?? 1e9) - (b.queuePosition ?? 1e9) || a.createdAt - b.createdAt);
      if (!jobs.length) continue;
      const group = document.createElement("div");
      group.className = "prio";
      group.dataset.priority = priority;
      const title = document.createElement("h3");
      title.textContent = `${priority} · ${jobs.length}`;
      const list = document.createElement("ol");
      for (const job of jobs) {
        let item = old.get(job.workflowId);
        if (!item) {
          item = clone("t-queued");
          item.dataset.id = job.workflowId;
          set(item, "id", job.workflowId);
          cancelButton(field(item, "cancel"), job.workflowId);
        }
        set(item, "position", job.queuePosition === 0 ? "starting" : `#${job.queuePosition ?? "?"}`);
        const age = field(item, "age");
        age.dataset.since = String(job.createdAt);
        age.dataset.prefix = "waiting ";
        age.textContent = `waiting ${duration(now() - job.createdAt)}`;
        list.append(item);
      }
      group.append(title, list);
      groups.push(group);
    }
    box.replaceChildren(...groups);
    $("queue-empty").hidden = queued.length > 0;
    renderQueueNote();
  }

  function renderQueueNote() {
    const note = $("queue-more");
    const total = status && status.queue && status.queue.byStatus ? status.queue.byStatus.queued : null;
    note.hidden = !queueTruncated;
    note.textContent = queueTruncated
      ? `Showing the newest ${queued.length} of ${total ?? "more"} queued jobs.` : "";
  }

  // -- completed, failed and cancelled jobs -----------------------------------

  function pagePath(list) {
    const p = pages[list];
    const params = new URLSearchParams({ status: p.status, limit: String(PAGE) });
    if (p.cursors[p.page]) params.set("cursor", p.cursors[p.page]);
    return `/v1/comfyui/workflows?${params}`;
  }

  async function loadPage(list) {
    const mine = session;
    try {
      const answer = await api(pagePath(list));
      if (mine === session) showPage(list, answer);
    } catch (err) {
      if (mine === session && err.status !== 401) notice(`Could not load the jobs: ${err.message}`);
    }
  }

  function showPage(list, answer) {
    const p = pages[list];
    p.next = answer.next;
    const items = answer.workflows.map((job) => {
      const item = clone("t-recent");
      item.dataset.id = job.workflowId;
      item.dataset.status = job.status;
      set(item, "id", job.workflowId);
      set(item, "status", job.status);
      if (STATUSES.includes(job.status)) field(item, "status").classList.add(job.status);
      // A finished job's bar says how far it got; a completed one needs none.
      if (job.status === "completed") field(item, "progress").remove();
      else progress(item, job.progress);
      set(item, "priority", job.priority);
      set(item, "backend", job.backend || "no backend");
      set(item, "when", when(job) + by(job));
      if (job.error && typeof job.error === "object") {
        set(item, "error-code", String(job.error.code ?? ""));
        set(item, "error-message", String(job.error.message ?? ""));
      } else {
        field(item, "error-code").parentElement.hidden = true;
      }
      const box = field(item, "thumbs");
      const outputs = Array.isArray(job.outputs) ? job.outputs : [];
      const images = outputs.filter((o) => IMAGE_FILE.test(String(o.filename)));
      for (const output of images.slice(0, THUMBS_PER_JOB)) box.append(thumb(output, ownPath(String(output.url))));
      const others = outputs.length - Math.min(images.length, THUMBS_PER_JOB);
      if (others > 0) {
        const more = document.createElement("span");
        more.className = "meta";
        more.textContent = `+${others} more file${others > 1 ? "s" : ""}`;
        box.append(more);
      }
      if (!box.childElementCount) box.hidden = true;
      return item;
    });
    $(list).replaceChildren(...items);
    pruneThumbs();
    $(`${list}-empty`).hidden = items.length > 0;
    $(`${list}-newer`).disabled = p.page === 0;
    $(`${list}-older`).disabled = !p.next;
  }

  function thumb(output, path) {
    const link = document.createElement("a");
    link.className = "thumb";
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.alt = String(output.filename);
    img.title = String(output.filename);
    img.decoding = "async";
    link.append(img);
    if (!path) return link;
    link.dataset.path = path;
    if (!thumbs.has(path)) {
      thumbs.set(path, api(path, { raw: true })
        .then((resp) => resp.blob())
        .then((blob) => URL.createObjectURL(blob))
        .catch(() => null));
    }
    thumbs.get(path).then((url) => {
      if (url && thumbs.has(path)) {
        img.src = url;
        link.href = url;
      } else {
        link.classList.add("missing");
      }
    });
    return link;
  }

  // Object URLs hold their images in memory: keep only those on show.
  function pruneThumbs() {
    const shown = new Set([...document.querySelectorAll("#done [data-path], #problems [data-path]")]
      .map((el) => el.dataset.path));
    for (const [path, promise] of thumbs) {
      if (shown.has(path)) continue;
      thumbs.delete(path);
      promise.then((url) => url && URL.revokeObjectURL(url));
    }
  }

  // Who submitted it: shown to admin keys only (the API leaves it out for clients).
  const by = (job) => (typeof job.submittedBy === "string" ? ` · by ${job.submittedBy}` : "");

  function when(job) {
    if (job.completionTime) {
      const took = job.startTime ? ` after ${duration(job.completionTime - job.startTime)}` : "";
      return `${job.status} ${ago(job.completionTime)}${took}`;
    }
    if (job.startTime) return `started ${ago(job.startTime)}`;
    return `submitted ${ago(job.createdAt)}`;
  }

  // -- cancel -----------------------------------------------------------------

  // Two clicks: the first arms the button for a few seconds, the second cancels.
  function cancelButton(button, id) {
    button.addEventListener("click", async () => {
      if (button.dataset.armed !== "yes") {
        button.dataset.armed = "yes";
        button.textContent = "Confirm cancel";
        setTimeout(() => {
          if (button.dataset.armed === "yes") {
            button.dataset.armed = "";
            button.textContent = "Cancel";
          }
        }, 4000);
        return;
      }
      button.dataset.armed = "";
      button.disabled = true;
      button.textContent = "Cancelling…";
      try {
        const answer = await api(jobPath(id), { method: "DELETE" });
        notice(answer.status === "cancelled" ? `Cancelled ${id}.` : `Interrupting ${id} on ComfyUI…`);
      } catch (err) {
        if (err.status !== 401) notice(`Could not cancel ${id}: ${err.message}`);
        button.disabled = false;
        button.textContent = "Cancel";
      }
      scheduleRefresh(["running", "queued", "problems"]);
    });
  }

  // -- submitting a workflow --------------------------------------------------

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  // The API-format graph in what a file holds, or {error}.
  function apiWorkflow(data) {
    if (isObject(data) && Array.isArray(data.nodes) && Array.isArray(data.links)) {
      return { error: "This file is a workflow in ComfyUI's UI format (it has \"nodes\" and \"links\"), " +
        "which only ComfyUI's editor reads. In ComfyUI, use Workflow → Export (API) and submit that file." };
    }
    if (isObject(data) && isObject(data.workflow)) data = data.workflow;  // a whole submit body
    if (!isObject(data) || !Object.keys(data).length) {
      return { error: "This file is not an API-format workflow: expected a JSON object of nodes." };
    }
    const bad = Object.entries(data).find(([, node]) =>
      !isObject(node) || typeof node.class_type !== "string" || !isObject(node.inputs));
    if (bad) {
      return { error: `Node ${bad[0]} has no class_type and inputs: this is not an API-format ` +
        "workflow (in ComfyUI: Workflow → Export (API))." };
    }
    return { workflow: data };
  }

  async function choose(file) {
    chosen = null;
    $("submit").disabled = true;
    $("file-name").textContent = file ? file.name : "";
    say("");
    if (!file) return;
    if (file.size > MAX_FILE) {
      say(`${file.name} is too large (${gib(file.size)} GiB) for a workflow.`, "error");
      return;
    }
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch {
      say(`${file.name} is not a JSON file.`, "error");
      return;
    }
    const found = apiWorkflow(data);
    if (found.error) {
      say(found.error, "error");
      return;
    }
    chosen = { name: file.name, workflow: found.workflow };
    $("submit").disabled = false;
    say(`${Object.keys(found.workflow).length} nodes, ready to submit.`);
  }

  async function submit(event) {
    event.preventDefault();
    if (!chosen) return;
    const button = $("submit");
    button.disabled = true;
    const priority = $("priority").value;
    try {
      const job = await api("/v1/comfyui/workflow", {
        method: "POST", body: { workflow: chosen.workflow, priority },
      });
      say(`Queued ${job.workflowId} (${job.priority}, position ${job.queuePosition ?? "-"}).`);
      scheduleRefresh(["queued"]);
    } catch (err) {
      if (err.status !== 401) say(`${err.body.error || "error"}: ${err.message}`, "error", nodeErrors(err.body));
    } finally {
      button.disabled = chosen === null;
    }
  }

  function nodeErrors(body) {
    const errors = body && isObject(body.details) && isObject(body.details.node_errors)
      ? body.details.node_errors : {};
    const lines = [];
    for (const [node, entry] of Object.entries(errors)) {
      for (const e of (isObject(entry) && Array.isArray(entry.errors) ? entry.errors : [])) {
        const kind = isObject(entry) && entry.class_type ? ` (${entry.class_type})` : "";
        const details = isObject(e) && e.details ? `: ${e.details}` : "";
        lines.push(`node ${node}${kind}: ${isObject(e) ? e.message : e}${details}`);
      }
    }
    return lines.slice(0, 10);
  }

  function say(text, kind = "", lines = []) {
    const box = $("submit-message");
    box.className = `message ${kind}`;
    box.textContent = text;
    if (lines.length) {
      const list = document.createElement("ul");
      for (const line of lines) {
        const li = document.createElement("li");
        li.textContent = line;
        list.append(li);
      }
      box.append(list);
    }
  }

  // -- small helpers ----------------------------------------------------------

  function clone(id) {
    return $(id).content.firstElementChild.cloneNode(true);
  }

  function field(root, name) {
    return root.querySelector(`[data-f="${name}"]`);
  }

  function set(root, name, text) {
    field(root, name).textContent = text == null ? "" : String(text);
  }

  function findCard(box, id) {
    return [...box.children].find((c) => c.dataset.id === id) || null;
  }

  const now = () => Date.now() + offset;

  function tick() {
    for (const el of document.querySelectorAll("[data-since]")) {
      el.textContent = (el.dataset.prefix || "") + duration(now() - Number(el.dataset.since));
    }
  }

  function duration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
  }

  const ago = (ms) => `${duration(now() - ms)} ago`;
  const gib = (bytes) => (Number(bytes) / 2 ** 30).toFixed(1);

  function setConn(state, text) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = text;
  }

  function notice(text) {
    const el = $("notice");
    el.textContent = text;
    el.hidden = false;
    clearTimeout(timers.notice);
    timers.notice = setTimeout(() => {
      el.hidden = true;
    }, 8000);
  }

  // -- wiring -----------------------------------------------------------------

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const given = $("key").value.trim();
    if (given) start(given);
  });
  $("forget").addEventListener("click", () => signOut(""));
  for (const list of Object.keys(pages)) {
    const p = pages[list];
    $(`${list}-older`).addEventListener("click", () => {
      if (!p.next) return;
      p.cursors[p.page + 1] = p.next;
      p.page++;
      loadPage(list);
    });
    $(`${list}-newer`).addEventListener("click", () => {
      if (p.page === 0) return;
      p.page--;
      loadPage(list);
    });
  }
  $("problems-filter").addEventListener("change", () => {
    Object.assign(pages.problems, { status: $("problems-filter").value, cursors: [null], page: 0 });
    loadPage("problems");
  });
  $("file").addEventListener("change", () => choose($("file").files[0] || null));
  $("submit-form").addEventListener("submit", submit);
  const drop = $("drop");
  // A file dropped anywhere else must not make the browser leave the page.
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) choose(file);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden || key === null) return;
    pollStatus();
    pumpPreviews();
  });

  const saved = sessionStorage.getItem(KEY_STORE);
  if (saved) start(saved);
  else showLogin("");
})();
