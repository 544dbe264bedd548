// The page of `lookalike serve`: search by an image (dropped, pasted or picked),
// search again by a result, and list the duplicate groups. Plain JavaScript,
// no build step and nothing fetched from anywhere but this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  let inFlight = null;    // AbortController of the search being answered
  let lastSearch = null;  // () => run the last search again (k or the folder changed)
  let previewUrl = null;  // object URL of the query preview, revoked when replaced
  let clipIds = 0;        // unique ids for the SVG clip paths of the boxes

  // ---- small helpers -------------------------------------------------------

  const oneLine = (text) => String(text).replace(/\s+/g, " ").trim();
  const baseName = (path) => String(path).split(/[\\/]/).pop() || String(path);
  // The file's name with its folder's: "louvre/p61.jpg" says more than "p61.jpg".
  const shortName = (path) => String(path).split(/[\\/]/).filter(Boolean).slice(-2).join("/");
  const thumbnailOf = (item) => item.thumbnail || `/api/images/${item.id}/thumbnail`;

  function element(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "text") el.textContent = value;
      else el.setAttribute(name, value);
    }
    el.append(...children);
    return el;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = oneLine(message);
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // fetch + JSON, turning every failure into an Error with one readable line:
  // the API's {"error": ...} when it sent one.
  async function api(url, options = {}) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new Error("cannot reach the lookalike server");
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      // Not JSON: reported below by the status.
    }
    if (!response.ok) {
      throw new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
    }
    if (body === null) throw new Error("the server's answer could not be read");
    return body;
  }

  // ---- header --------------------------------------------------------------

  async function loadHealth() {
    try {
      const health = await api("/api/health");
      const n = Number(health.images);
      $("image-count").textContent = `${n.toLocaleString("en")} image${n === 1 ? "" : "s"} indexed`;
    } catch (err) {
      $("image-count").textContent = "database unavailable";
      showError(err.message);
    }
  }

  // ---- search --------------------------------------------------------------

  function searchParams() {
    const params = new URLSearchParams({ k: $("k").value });
    const under = $("under").value.trim();
    if (under) params.append("under", under);
    return params;
  }

  function showQuery(src, name) {
    if (previewUrl && previewUrl !== src) URL.revokeObjectURL(previewUrl);
    previewUrl = src.startsWith("blob:") ? src : null;
    $("query-image").src = src;
    $("query-image").alt = `Query image: ${baseName(name)}`;
    $("query-name").textContent = name;
    $("query-name").title = name;
    $("query").hidden = false;
  }

  async function runSearch(url, options, preview) {
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    clearError();
    showQuery(preview.src, preview.name);
    $("results").replaceChildren();
    $("results").setAttribute("aria-busy", "true");
    $("search-status").textContent = "Searching…";
    try {
      const body = await api(url, { ...options, signal: controller.signal });
      renderResults(body.results || []);
    } catch (err) {
      if (err.name === "AbortError") return;
      $("search-status").textContent = "";
      $("query").hidden = true;
      showError(err.message);
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        $("results").removeAttribute("aria-busy");
      }
    }
  }

  function searchFile(file) {
    if (!file) return;
    const name = file.name || "pasted image";
    lastSearch = () => {
      const form = new FormData();
      form.append("file", file, name);
      runSearch(`/api/search?${searchParams()}`, { method: "POST", body: form },
                { src: URL.createObjectURL(file), name });
    };
    lastSearch();
  }

  function searchById(id, path) {
    showTab("search");
    lastSearch = () => runSearch(`/api/images/${id}/similar?${searchParams()}`, {},
                                 { src: `/api/images/${id}/thumbnail`, name: path });
    lastSearch();
  }

  // The matched region: the box's corners are in the result's upright pixels, so
  // an SVG whose viewBox is the image's size, fitted like the thumbnail
  // (object-fit: contain = preserveAspectRatio meet), scales them onto it.
  function boxOverlay(result) {
    const { width, height } = result;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    svg.setAttribute("class", "box");
    svg.setAttribute("data-testid", "box");
    svg.setAttribute("aria-hidden", "true");
    // Corners may lie outside the image: clip to it, not to the letterboxed frame.
    const clipId = `clip-${++clipIds}`;
    const clip = document.createElementNS(SVG, "clipPath");
    clip.setAttribute("id", clipId);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("width", width);
    rect.setAttribute("height", height);
    clip.append(rect);
    const polygon = document.createElementNS(SVG, "polygon");
    polygon.setAttribute("points", result.box.map(([x, y]) => `${x},${y}`).join(" "));
    polygon.setAttribute("clip-path", `url(#${clipId})`);
    polygon.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(clip, polygon);
    return svg;
  }

  function resultCard(result, rank) {
    const name = baseName(result.path);
    const frame = element("span", { class: "frame" },
      element("img", { src: thumbnailOf(result), alt: `Result ${rank}: ${name}`, loading: "lazy",
                       width: result.width, height: result.height }));
    if (Array.isArray(result.box) && result.box.length === 4) frame.append(boxOverlay(result));
    const pick = element("button", { type: "button", class: "pick", title: result.path,
                                     "aria-label": `Search by ${name}` }, frame);
    pick.addEventListener("click", () => searchById(result.id, result.path));

    const meta = element("p", { class: "meta" },
      element("span", { class: "score", "data-testid": "score", title: "similarity (1 = the same picture)",
                        text: result.score.toFixed(3) }));
    if (result.inliers > 0) {
      meta.append(element("span", { class: "inliers", "data-testid": "inliers",
                                    text: `${result.inliers} inliers` }));
    }
    const open = element("a", { class: "path", href: `/api/images/${result.id}/file`, target: "_blank",
                                rel: "noopener", title: result.path, text: shortName(result.path) });
    return element("li", { class: "result", "data-testid": "result", "data-id": result.id,
                           "data-path": result.path }, pick, meta, open);
  }

  function renderResults(results) {
    $("results").replaceChildren(...results.map((r, i) => resultCard(r, i + 1)));
    $("search-status").textContent = results.length
      ? `${results.length} result${results.length === 1 ? "" : "s"}`
      : "No images found (is the folder right?)";
  }

  // ---- duplicates ----------------------------------------------------------

  function formatBytes(n) {
    if (!(n >= 0)) return "";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function memberCard(member, group, isKeeper) {
    const name = baseName(member.path);
    const pick = element("button", { type: "button", class: "pick", title: member.path,
                                     "aria-label": `Search by ${name}` },
      element("span", { class: "frame" },
        element("img", { src: thumbnailOf(member), loading: "lazy",
                         alt: `${name}${isKeeper ? " (suggested keeper)" : ""}` })));
    pick.addEventListener("click", () => searchById(member.id, member.path));

    const meta = element("p", { class: "meta" });
    if (isKeeper) meta.append(element("span", { class: "keeper", "data-testid": "keeper", text: "Keep" }));
    else if (group.kind === "exact") meta.append(element("span", { class: "score", text: "identical" }));
    else meta.append(element("span", { class: "score", "data-testid": "similarity",
                                       text: `similarity ${Number(member.similarity).toFixed(3)}` }));
    const facts = [member.inliers > 0 && `${member.inliers} inliers`,
                   member.width && `${member.width}×${member.height}`, formatBytes(member.bytes)];
    meta.append(element("span", { class: "facts", text: facts.filter(Boolean).join(", ") }));
    const open = element("a", { class: "path", href: `/api/images/${member.id}/file`, target: "_blank",
                                rel: "noopener", title: member.path, text: shortName(member.path) });
    return element("li", { class: isKeeper ? "member is-keeper" : "member", "data-testid": "dup-member",
                           "data-path": member.path }, pick, meta, open);
  }

  function groupRow(group) {
    const members = group.members || [];
    // The keeper comes first; match it by path in case the order ever changes.
    const keeperAt = Math.max(0, members.findIndex((m) => m.path === group.keeper));
    const title = group.kind === "exact" ? "Identical files" : "Near duplicates";
    return element("li", { class: "group", "data-testid": "dup-group", "data-kind": group.kind },
      element("h2", { text: `${title} · ${members.length} images` }),
      element("ul", { class: "row" }, ...members.map((m, i) => memberCard(m, group, i === keeperAt))));
  }

  async function findDuplicates() {
    const params = new URLSearchParams();
    const under = $("dup-under").value.trim();
    if (under) params.append("under", under);
    if ($("dup-exact").checked) params.set("exact_only", "true");
    clearError();
    $("groups").replaceChildren();
    $("dup-status").textContent = "Looking for duplicates…";
    $("dup-find").disabled = true;
    try {
      const body = await api(`/api/duplicates?${params}`);
      const groups = body.groups || [];
      $("groups").replaceChildren(...groups.map(groupRow));
      $("dup-status").textContent = groups.length
        ? `${groups.length} group${groups.length === 1 ? "" : "s"}; the suggested keeper is marked Keep`
        : "No duplicates found";
    } catch (err) {
      $("dup-status").textContent = "";
      showError(err.message);
    } finally {
      $("dup-find").disabled = false;
    }
  }

  // ---- tabs ----------------------------------------------------------------

  function showTab(which) {
    for (const name of ["search", "duplicates"]) {
      const tab = $(`tab-${name}`);
      const selected = name === which;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`${name}-view`).hidden = !selected;
    }
  }

  // ---- wiring --------------------------------------------------------------

  function firstImageFile(items) {
    for (const item of items || []) {
      const file = item instanceof File ? item : item.kind === "file" && item.getAsFile();
      if (file && (!file.type || file.type.startsWith("image/"))) return file;
    }
    return null;
  }

  function wire() {
    $("file").addEventListener("change", (event) => {
      searchFile(event.target.files[0]);
      event.target.value = "";  // picking the same file again searches again
    });
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (lastSearch) lastSearch();
    });
    $("k").addEventListener("change", () => lastSearch && lastSearch());

    // Drop anywhere on the page; the browser would otherwise open the file itself.
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      document.body.classList.add("dragging");
    });
    document.addEventListener("dragleave", (event) => {
      if (!event.relatedTarget) document.body.classList.remove("dragging");
    });
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      document.body.classList.remove("dragging");
      const files = event.dataTransfer ? event.dataTransfer.files : [];
      if (files.length) searchFile(files[0]);
      else showError("drop an image file (a picture dragged from a web page is only a link)");
    });
    document.addEventListener("paste", (event) => {
      const file = firstImageFile(event.clipboardData && event.clipboardData.items);
      if (!file) return;  // text pasted into a field stays text
      event.preventDefault();
      searchFile(file);
    });

    $("duplicates-form").addEventListener("submit", (event) => {
      event.preventDefault();
      findDuplicates();
    });
    for (const name of ["search", "duplicates"]) {
      const tab = $(`tab-${name}`);
      tab.addEventListener("click", () => showTab(name));
      tab.addEventListener("keydown", (event) => {
        if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
        const other = name === "search" ? "duplicates" : "search";
        showTab(other);
        $(`tab-${other}`).focus();
      });
    }
  }

  wire();
  loadHealth();
})();
