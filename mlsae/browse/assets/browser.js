// mlsae latent browser: renders the inline JSON payload (see mlsae/browse/data.py) with plain DOM
// and SVG. Every string from the corpus or the tokenizer goes through textContent, never innerHTML.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const L = D.meta.layers.length;
  const byId = new Map(D.latents.map((r) => [r.id, r]));
  const view = document.getElementById("view");
  const state = { key: "count", desc: true, filter: "", minCount: 0 };

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function fmt(x, d) { return x == null ? "–" : Number(x).toFixed(d === undefined ? 2 : d); }
  function tokText(id) {
    const s = D.vocab[String(id)];
    return s === undefined ? "<" + id + ">" : s.replace(/\n/g, "\u21b5");
  }
  function shade(v, vmax) {  // white -> orange by v / vmax
    const a = vmax > 0 ? Math.max(0, Math.min(1, v / vmax)) : 0;
    return "rgba(245, 133, 24, " + (0.08 + 0.8 * a).toFixed(3) + ")";
  }
  function latentLink(id) {
    if (byId.has(id)) return el("a", { href: "#/latent/" + id, text: "#" + id });
    return el("span", { class: "muted", title: "no page (not among the shown latents)", text: "#" + id });
  }

  // --- charts -------------------------------------------------------------------------------
  function bars(values, opts) {  // vertical bars; opts: width, height, cls, labels (x tick labels)
    const w = opts.width, h = opts.height, pad = opts.axes ? 18 : 0;
    const s = svg("svg", { width: w, height: h + pad, class: opts.cls, role: "img" });
    const vmax = Math.max(1e-12, ...values.map((v) => v || 0));
    const bw = w / Math.max(1, values.length);
    values.forEach((v, i) => {
      const bh = (h - 2) * (v || 0) / vmax;
      const r = svg("rect", { class: "bar", x: (i * bw + 0.5).toFixed(2), y: (h - bh).toFixed(2),
        width: Math.max(0.5, bw - 1).toFixed(2), height: Math.max(0, bh).toFixed(2) });
      const t = svg("title"); t.textContent = (opts.labels ? opts.labels[i] : i) + ": " + fmt(v, 3);
      r.append(t); s.append(r);
    });
    if (opts.axes) {
      const step = Math.max(1, Math.ceil(values.length / (opts.ticks || 10)));
      for (let i = 0; i < values.length; i += step) {
        const t = svg("text", { class: "axis", x: (i === 0 ? 0 : i * bw + bw / 2).toFixed(1), y: h + 12,
          "text-anchor": i === 0 ? "start" : "middle" });
        t.textContent = opts.labels ? opts.labels[i] : String(i);
        s.append(t);
      }
    }
    return s;
  }
  function heatmap(ctx) {  // rows: layers (first at top), columns: window positions
    const n = ctx.tokens.length, cw = 12, ch = Math.max(3, Math.min(8, Math.floor(180 / L))), left = 28;
    const s = svg("svg", { width: left + n * cw, height: Math.max(L * ch, 18) + 2, class: "heatmap", role: "img" });
    s.append(svg("rect", { x: left, y: 0, width: n * cw, height: L * ch, fill: "#f7f7f7" }));
    const vmax = Math.max(1e-12, ...ctx.heat.map((e) => e[2]));
    for (const [p, l, v] of ctx.heat) {
      const r = svg("rect", { class: "cell", x: left + p * cw, y: l * ch, width: cw - 1, height: ch, fill: shade(v, vmax) });
      const t = svg("title"); t.textContent = "block " + D.meta.layers[l] + ", " + JSON.stringify(tokText(ctx.tokens[p])) + ": " + fmt(v, 3);
      r.append(t); s.append(r);
    }
    for (const l of [0, L - 1]) {
      const t = svg("text", { class: "axis", x: 0, y: Math.max(9, l * ch + ch) }); t.textContent = "b" + D.meta.layers[l]; s.append(t);
    }
    const pk = svg("rect", { x: left + ctx.peak * cw, y: 0, width: cw - 1, height: L * ch, fill: "none", stroke: "#c0392b" });
    s.append(pk);
    return s;
  }

  // --- index --------------------------------------------------------------------------------
  const COLS = [
    ["id", "latent"], ["count", "active tokens"], ["mu", "\u03bc_f"], ["sigma", "\u03c3_f"],
    ["within", "within_share"], ["eff", "effective layers"], [null, "P_f over layers"], [null, "decoder top tokens"],
  ];
  function showIndex() {
    view.replaceChildren();
    const notes = el("div", { class: "notes" },
      el("div", { text: "within_share: " + D.meta.columns.within_share }),
      el("div", { text: "effective layers: " + D.meta.columns.effective_layers }),
      el("div", { text: "\u03bc_f, \u03c3_f: mean and std of the layer position under P_f(\u2113) \u221d \u03a3_t a[t,\u2113,f]. " +
        "Showing the " + D.latents.length + " most often active of " + D.meta.n_active + " active latents." }));
    const filter = el("input", { id: "filter", type: "search", placeholder: "id or token text" });
    filter.value = state.filter;
    const minc = el("input", { id: "min-count", type: "number", min: "0" });
    minc.value = state.minCount;
    const controls = el("div", { class: "controls" },
      el("label", { text: "filter " }, filter), el("label", { text: "min active tokens " }, minc));
    const table = el("table", { class: "latents", id: "latents" });
    const head = el("tr");
    for (const [key, label] of COLS) {
      const th = el("th", { text: label });
      if (key) {
        th.dataset.key = key;
        if (state.key === key) th.className = state.desc ? "sorted-desc" : "sorted-asc";
        th.addEventListener("click", () => {
          state.desc = state.key === key ? !state.desc : key !== "id";
          state.key = key; showIndex();
        });
      }
      head.append(th);
    }
    table.append(el("thead", {}, head));
    const body = el("tbody");
    const needle = state.filter.trim().toLowerCase();
    const rows = D.latents.filter((r) => r.count >= state.minCount && (!needle || String(r.id) === needle ||
      r.top.some(([t]) => tokText(t).toLowerCase().includes(needle))));
    const k = state.key, sign = state.desc ? -1 : 1;
    rows.sort((a, b) => {
      const x = a[k], y = b[k];
      if (x == null && y == null) return a.id - b.id;
      if (x == null) return 1;
      if (y == null) return -1;
      return x === y ? a.id - b.id : sign * (x < y ? -1 : 1);
    });
    for (const r of rows) {
      const tr = el("tr", { class: "latent-row", "data-id": String(r.id) },
        el("td", {}, el("a", { href: "#/latent/" + r.id, text: "#" + r.id })),
        el("td", { text: String(r.count) }), el("td", { text: fmt(r.mu) }), el("td", { text: fmt(r.sigma) }),
        el("td", { text: fmt(r.within, 3) }), el("td", { text: fmt(r.eff) }),
        el("td", {}, bars(r.dist, { width: Math.max(60, 3 * L), height: 16, cls: "spark" })),
        el("td", { class: "tokens", text: r.top.slice(0, 4).map(([t]) => JSON.stringify(tokText(t))).join(" ") }));
      body.append(tr);
    }
    table.append(body);
    view.append(notes, controls, el("p", { class: "muted", id: "row-count", text: rows.length + " latents" }), table);
    filter.addEventListener("change", () => { state.filter = filter.value; showIndex(); });
    minc.addEventListener("change", () => { state.minCount = Number(minc.value) || 0; showIndex(); });
  }

  // --- latent page --------------------------------------------------------------------------
  function tokenLine(tokens, values, peak) {
    const vmax = Math.max(1e-12, ...values);
    const line = el("div", { class: "line" });
    tokens.forEach((t, i) => {
      const span = el("span", { class: "tok" + (i === peak ? " peak" : ""), text: tokText(t),
        title: "activation " + fmt(values[i], 3) });
      if (values[i] > 0) span.style.background = shade(values[i], vmax);
      line.append(span);
    });
    return line;
  }
  function showLatent(id) {
    const r = byId.get(id);
    view.replaceChildren();
    if (!r) { view.append(el("p", { text: "Latent " + id + " has no page." })); return; }
    const blocks = D.meta.layers.map(String);
    view.append(el("h2", { text: "Latent #" + r.id }),
      el("p", { text: "active on " + r.count + " eval tokens \u00b7 \u03bc_f " + fmt(r.mu) + " \u00b7 \u03c3_f " + fmt(r.sigma) +
        " \u00b7 within_share " + fmt(r.within, 3) + " \u00b7 effective layers " + fmt(r.eff) }));
    const lens = el("table", { class: "lens", id: "logit-lens" });
    lens.append(el("tr", {}, el("th", { text: "top" }), el("th"), el("th", { text: "bottom" }), el("th")));
    for (let i = 0; i < Math.max(r.top.length, r.bottom.length); i++) {
      const a = r.top[i] || [null, null], b = r.bottom[i] || [null, null];
      lens.append(el("tr", {}, el("td", { text: a[0] == null ? "" : JSON.stringify(tokText(a[0])) }), el("td", { text: fmt(a[1]) }),
        el("td", { text: b[0] == null ? "" : JSON.stringify(tokText(b[0])) }), el("td", { text: fmt(b[1]) })));
    }
    const nn = el("ul", { id: "neighbours" });
    for (const [g, c] of r.nn) nn.append(el("li", {}, latentLink(g), " cos " + fmt(c, 3)));
    const edges = r.hist.counts.map((_, i) => fmt((i + 0.5) * r.hist.max / r.hist.counts.length, 2));
    view.append(el("div", { class: "panels" },
      el("div", { class: "panel" }, el("h3", { text: "P_f(\u2113) over blocks" }),
        bars(r.dist, { width: Math.max(240, 12 * L), height: 120, cls: "pf-chart", axes: true, labels: blocks })),
      el("div", { class: "panel" }, el("h3", { text: "activation histogram (entries a[t,\u2113,f] > 0, max " + fmt(r.hist.max, 3) + ")" }),
        bars(r.hist.counts, { width: 240, height: 120, cls: "hist-chart", axes: true, labels: edges, ticks: 4 })),
      el("div", { class: "panel" }, el("h3", { text: "decoder logit lens (" + (D.meta.lens === "none" ? "W_U \u00b7 (\u03b3 \u2299 d_f)" : "lens space: W_U \u00b7 (\u03b3 \u2299 d_f)") + ")" }), lens),
      el("div", { class: "panel" }, el("h3", { text: "nearest latents (decoder cosine)" }), nn)));
    view.append(el("h3", { text: "top contexts (peak token outlined; heatmap: blocks \u00d7 positions, this latent only)" }));
    r.ctx.forEach((c, i) => {
      const peakAt = new Array(c.tokens.length).fill(0);
      for (const [p, , v] of c.heat) peakAt[p] = Math.max(peakAt[p], v);
      view.append(el("div", { class: "context", id: "context-" + i },
        el("div", { class: "caption", text: "peak " + fmt(c.value, 3) + " at block " + D.meta.layers[c.layer] }),
        tokenLine(c.tokens, peakAt, c.peak), heatmap(c)));
    });
    if (!r.ctx.length) view.append(el("p", { class: "muted", text: "no contexts" }));
  }

  // --- prompt view --------------------------------------------------------------------------
  function showPrompts() {
    view.replaceChildren(el("p", { class: "notes", text: "Eval contexts token by token. Pick a token: its " +
      D.meta.params.prompt_latents + " strongest latents (peak over blocks) with their activation at every block." }));
    const panel = el("div", { id: "token-panel" }, el("span", { class: "muted", text: "no token picked" }));
    D.prompts.forEach((pr, pi) => {
      view.append(el("div", { class: "caption muted", text: "eval context " + pi }));
      const line = el("div", { class: "prompt", id: "prompt-" + pi });
      pr.tokens.forEach((t, i) => {
        const span = el("span", { class: "tok" + (pr.special[i] ? " special" : ""), text: tokText(t), "data-pos": String(i) });
        span.addEventListener("click", () => {
          for (const s of document.querySelectorAll(".tok.picked")) s.classList.remove("picked");
          span.classList.add("picked");
          panel.replaceChildren(el("div", { text: "token " + JSON.stringify(tokText(t)) + " (context " + pi + ", position " + i + ")" }));
          for (const [f, peak, entries] of pr.latents[i]) {
            const acts = new Array(L).fill(0);
            for (const [l, v] of entries) acts[l] = v;
            panel.append(el("div", { class: "row" }, latentLink(f), el("span", { text: "peak " + fmt(peak, 3) }),
              bars(acts, { width: Math.max(120, 4 * L), height: 24, cls: "token-layers", labels: D.meta.layers.map(String) })));
          }
          if (!pr.latents[i].length) panel.append(el("div", { class: "muted", text: "no active latent" }));
        });
        line.append(span);
      });
      view.append(line);
    });
    view.append(panel);
  }

  function route() {
    const h = location.hash;
    const m = /^#\/latent\/(\d+)$/.exec(h);
    if (m) showLatent(Number(m[1]));
    else if (h === "#/prompts") showPrompts();
    else showIndex();
    window.scrollTo(0, 0);
  }
  document.getElementById("meta").textContent = (D.meta.model || "run") + " \u00b7 " + L + " blocks \u00b7 " +
    D.meta.n_latents + " latents (k = " + D.meta.k + ") \u00b7 " + D.meta.n_tokens + " eval tokens \u00b7 lens: " + D.meta.lens;
  window.addEventListener("hashchange", route);
  route();
})();
