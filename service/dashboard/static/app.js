// kdsearch dashboard: polls the REST API and redraws; no build step, no CDN. Plotly comes from the plotly package.
const kd = (() => {
  const REFRESH_MS = 2000;
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v, d = 4) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
  const sci = (v) => (v === null || v === undefined ? "" : Number(v).toPrecision(3));
  const dur = (s) => (s === null || s === undefined ? "" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
  const active = (s) => s === "queued" || s === "running";
  const metricOf = (study) => study.metric || "score";  // unknown until a worker has read a hub teacher's config
  const usesTemperature = (study) => !((study.task && study.task.ignored_params) || []).includes("temperature");
  const PLOT = {displayModeBar: false, responsive: true};
  const IMPORTANCE_MIN_TRIALS = 10;  // below this, the importances chart carries a caveat
  const BASE = {margin: {t: 10, r: 10, b: 45, l: 55}, legend: {orientation: "h"}};

  // With KDSEARCH_API_TOKEN set (and reads not public), the API answers 401 until the token is given once.
  const auth = () => { const t = localStorage.getItem("kdsearch-token"); return t ? {Authorization: `Bearer ${t}`} : {}; };
  async function request(url, options = {}) {
    const go = () => fetch(url, {...options, headers: {...(options.headers || {}), ...auth()}});
    let r = await go();
    if (r.status === 401) {
      const token = window.prompt("kdsearch API token");
      if (token) { localStorage.setItem("kdsearch-token", token); r = await go(); }
    }
    return r;
  }
  const json = async (url) => { const r = await request(url); if (!r.ok) throw new Error(`${url}: ${r.status}`); return r.json(); };
  const etags = {};
  // Conditional GET: the server answers 304 (no body) while nothing changed.
  async function changed(url) {
    const r = await request(url, {headers: etags[url] ? {"If-None-Match": etags[url]} : {}});
    if (r.status === 304) return null;
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    etags[url] = r.headers.get("ETag");
    return r.json();
  }
  // A failed refresh says so on the page (the API down, a 5xx, a lost token), and the banner goes once one works.
  const showError = (message) => { const el = document.getElementById("fetch-error"); if (!el) return; el.hidden = !message; el.textContent = message ? `could not refresh: ${message}` : ""; };
  const loop = (fn, ms = REFRESH_MS) => { const tick = async () => { let again = true; try { again = await fn(); showError(""); } catch (e) { console.warn(e); showError(e.message || String(e)); } setTimeout(tick, again === false ? 5 * ms : ms); }; tick(); };
  // A preparation under way (the teacher labelling rows, the transfer set): a bar, rows, rate and the server's ETA.
  const prepBar = (p) => `<span class="progress preparing"><div style="width:${p.total ? Math.round((100 * p.done) / p.total) : 0}%"></div></span>`;
  // Rows, rate and ETA are as of the worker's last report (a few a minute): they agree, and the age says how old.
  const prepText = (p) => `preparing ${esc(p.stage.replace("_", " "))}: ${p.done.toLocaleString()} / ${p.total.toLocaleString()} rows` +
    (p.rate ? `, ${Math.round(p.rate).toLocaleString()} rows/s` : "") + (p.eta_s !== null && p.eta_s !== undefined ? `, ETA ${dur(p.eta_s)}` : "") +
    (p.age_s >= 1 ? ` (reported ${dur(p.age_s)} ago)` : "");
  const trialHref = (study, number) => `/studies/${encodeURIComponent(study)}/trials/${number}`;
  const retryText = (r) => `preparation failed ${r.attempts} time${r.attempts > 1 ? "s" : ""} (${esc(r.last_error || "?")}); retrying${r.retry_at ? ` after ${new Date(r.retry_at).toLocaleTimeString()}` : ""}`;

  async function cancel(name) {
    if (!window.confirm(`Cancel study ${name}? Running trials stop at their next epoch.`)) return;
    // A JSON request: without a token, the API refuses any other (a cross-site form could send those).
    const r = await request(`/api/studies/${encodeURIComponent(name)}/cancel`, {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
    if (!r.ok) window.alert(`cancel failed: ${r.status}`);
  }

  // ------------------------------------------------------------------------------------------- studies page
  const EXAMPLE = {name: "sst2-search", teacher: "../shared/models/sst2-teacher",
    student: {config: {num_hidden_layers: 2, hidden_size: 128, num_attention_heads: 2, intermediate_size: 512}},
    dataset: {path: "../shared/data/sst2", max_train_samples: 6000},
    search_space: {num_train_epochs: {low: 2, high: 5}}, n_trials: 20, priority: 0};

  function studiesPage() {
    const spec = document.getElementById("spec");
    spec.value = JSON.stringify(EXAMPLE, null, 2);
    document.getElementById("submit").onclick = async () => {
      const out = document.getElementById("launch-result");
      let body;
      try { body = JSON.parse(spec.value); } catch (e) { out.innerHTML = `<span class="error">not JSON: ${esc(e.message)}</span>`; return; }
      const r = await request("/api/studies", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      const data = await r.json().catch(() => ({}));
      if (r.ok) { out.innerHTML = `queued <a href="/studies/${encodeURIComponent(data.name)}">${esc(data.name)}</a>`; return; }
      const detail = Array.isArray(data.detail) ? data.detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ") : data.detail;
      out.innerHTML = `<span class="error">${r.status}: ${esc(detail)}</span>`;
    };
    document.querySelector("#studies tbody").addEventListener("click", (e) => { if (e.target.dataset.cancel) cancel(e.target.dataset.cancel); });
    loop(async () => {
      const studies = await json("/api/studies");
      document.querySelector("#studies tbody").innerHTML = studies.map((s) => {
        const pct = Math.round((100 * s.finished) / s.n_trials);
        const elapsed = s.elapsed_s;
        const eta = s.preparing ? s.preparing.eta_s : s.eta_s;  // computed by the server, never here
        // A preparation's progress and a failed study's error get a full-width row under the study: in a column
        // they widened the table past the window (the cancel button off screen) or wrapped one word per line.
        const detail = s.preparing ? `<div class="small muted">${prepBar(s.preparing)} ${prepText(s.preparing)}</div>` :
          s.prepare_retry ? `<div class="small error">${retryText(s.prepare_retry)}</div>` :
          s.error && !active(s.status) ? `<div class="error study-error">${esc(s.error)}</div>` : "";
        return `<tr class="${detail ? "has-detail" : ""}"><td class="name"><a href="/studies/${encodeURIComponent(s.name)}">${esc(s.name)}</a></td>
          <td><span class="badge ${esc(s.status)}">${esc(s.status)}</span></td><td class="num">${s.priority}</td>
          <td><span class="progress"><div style="width:${pct}%"></div></span> ${s.finished}/${s.n_trials}</td>
          <td class="num">${s.counts.complete}</td><td class="num">${s.counts.pruned}</td><td class="num">${s.counts.running}</td>
          <td class="num">${s.counts.failed}</td><td class="num">${fmt(s.best_value)}${s.metric ? ` <span class="muted">${esc(s.metric)}</span>` : ""}</td><td>${dur(elapsed)}</td><td>${dur(eta)}</td>
          <td>${active(s.status) ? `<button data-cancel="${esc(s.name)}">cancel</button>` : ""}</td></tr>` +
          (detail ? `<tr class="detail" data-study="${esc(s.name)}"><td colspan="12">${detail}</td></tr>` : "");
      }).join("");
      await drawWorkers();
    });
  }

  async function drawWorkers() {
    const workers = await json("/api/workers");
    // The study by name and the trial by number (ids mean nothing to a reader), each a link.
    document.querySelector("#workers tbody").innerHTML = workers.map((w) => `<tr><td>${esc(w.id)}</td><td>${esc(w.host)}</td><td>${esc(w.device)}</td>
      <td>${esc(w.status)}</td><td class="study">${w.current_study_name ? `<a href="/studies/${encodeURIComponent(w.current_study_name)}">${esc(w.current_study_name)}</a>` : ""}</td>
      <td class="trial">${w.current_study_name && w.current_trial_number !== null ? `<a href="${trialHref(w.current_study_name, w.current_trial_number)}">#${w.current_trial_number}</a>` : ""}</td>
      <td class="num">${w.heartbeat_age_s}</td></tr>`).join("");
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  const workersPage = () => loop(drawWorkers);

  // --------------------------------------------------------------------------------------------- study page
  function drawCharts(summary) {
    const study = summary.study;
    const metric = metricOf(study);
    const done = summary.points.filter((t) => t.value !== null && (t.state === "COMPLETE" || t.state === "PRUNED"));
    let best = -Infinity;
    const bestLine = done.map((t) => (best = Math.max(best, t.state === "COMPLETE" ? t.value : best)));
    const ref = study.teacher_metric;
    const teacher = ref !== null && ref !== undefined ? [{type: "line", xref: "paper", x0: 0, x1: 1, y0: ref, y1: ref, line: {dash: "dot", color: "#1f9d55"}}] : [];
    const withT = usesTemperature(study);
    const label = (t) => `#${t.number} ${t.state} ${metric}=${fmt(t.value)} lr=${sci(t.params.learning_rate)}${withT ? ` T=${fmt(t.params.temperature, 2)}` : ""} α=${fmt(t.params.alpha, 2)}`;
    Plotly.react("history", [
      {x: done.map((t) => t.number), y: done.map((t) => t.value), mode: "markers", name: "trial", text: done.map(label),
       marker: {color: done.map((t) => (t.state === "PRUNED" ? "#c27c0e" : "#3563e9"))}},
      {x: done.map((t) => t.number), y: bestLine.map((v) => (v === -Infinity ? null : v)), mode: "lines", name: "best so far", line: {shape: "hv"}},
    ], {...BASE, shapes: teacher, xaxis: {title: {text: "trial"}}, yaxis: {title: {text: `eval ${metric}`}}}, PLOT);
    const states = Object.fromEntries(summary.points.map((t) => [t.number, t.state]));
    Plotly.react("curves", Object.entries(summary.curves).map(([n, pts]) => ({
      // A one-epoch trial is a single point: a line through one point draws nothing, so it is a marker.
      x: pts.map((p) => p[0]), y: pts.map((p) => p[1]), mode: pts.length > 1 ? "lines" : "markers", name: `#${n}`, hoverinfo: "name+y",
      line: {dash: states[n] === "PRUNED" ? "dot" : "solid", width: 1.2}})),
      {...BASE, shapes: teacher, showlegend: false, xaxis: {title: {text: "epoch"}, dtick: 1}, yaxis: {title: {text: `eval ${metric}`}}}, PLOT);
    const withParams = done.filter((t) => t.params.temperature !== undefined || t.params.alpha !== undefined || t.params.learning_rate !== undefined);
    const colour = {color: withParams.map((t) => t.value), colorscale: "Viridis", showscale: true, colorbar: {title: {text: metric}}};
    // A regression study has no temperature: its second chart is learning rate × alpha instead.
    const scatterX = withT ? "temperature" : "learning_rate";
    Plotly.react("scatter", [{x: withParams.map((t) => t.params[scatterX]), y: withParams.map((t) => t.params.alpha), mode: "markers",
      text: withParams.map(label), marker: {...colour, size: 9}}], {...BASE, xaxis: {title: {text: scatterX}, type: withT ? "linear" : "log"}, yaxis: {title: {text: "alpha"}}}, PLOT);
    Plotly.react("slice", [{x: withParams.map((t) => t.params.learning_rate), y: withParams.map((t) => t.value), mode: "markers",
      text: withParams.map(label), marker: {color: withParams.map((t) => (t.state === "PRUNED" ? "#c27c0e" : "#3563e9"))}}],
      {...BASE, xaxis: {title: {text: "learning_rate"}, type: "log"}, yaxis: {title: {text: `eval ${metric}`}}}, PLOT);
    const names = [...new Set(withParams.flatMap((t) => Object.keys(t.params)))].filter((k) => withParams.every((t) => typeof t.params[k] === "number"));
    if (withParams.length) {
      Plotly.react("parallel", [{type: "parcoords", line: {color: withParams.map((t) => t.value), colorscale: "Viridis", showscale: true},
        dimensions: [...names.map((k) => ({label: k === "learning_rate" ? "log10 lr" : k, values: withParams.map((t) => (k === "learning_rate" ? Math.log10(t.params[k]) : t.params[k]))})),
          {label: metric, values: withParams.map((t) => t.value)}]}], {margin: {t: 60, r: 40, b: 20, l: 50}}, PLOT);
    }
  }

  // ------------------------------------------------------------------------------------------- Pareto front
  // The costs a student is measured on, from the server's registry (GET /api/objectives): each with its name (the
  // profile key), titles, unit, decimals, axis and export-best option. Fetched once per page, before the first draw.
  let COSTS = [];
  let registry = null;
  // The hyperparameters a trial's row shows, with their short names (GET /api/hyperparameters: the training ones and
  // every distillation term's), fetched with the costs.
  let HYPERPARAMETERS = [];
  const loadCosts = () => (registry = registry || Promise.all([json("/api/objectives"), json("/api/hyperparameters")])
    .then(([r, h]) => { COSTS = r.costs; HYPERPARAMETERS = h; return r; }).catch((e) => { registry = null; throw e; }));
  const costOf = (name) => COSTS.find((c) => c.name === name) ||
    {name, title: name, column: name, short: name, unit: "", decimals: 0, is_count: true, log_axis: true, option: `--max-${String(name).replace(/_/g, "-")}`};
  const measured = (profile, c) => profile && profile[c.name] !== null && profile[c.name] !== undefined;
  const shapeText = (s) => (s ? `L${s.num_hidden_layers} H${s.hidden_size} A${s.num_attention_heads} I${s.intermediate_size}` : "");
  const millions = (v) => (v === null || v === undefined ? "" : v >= 1e6 ? `${(v / 1e6).toFixed(2)}M` : v >= 1e3 ? `${(v / 1e3).toFixed(1)}k` : String(v));
  // "4.40M params", "12.3M FLOPs", "1.52 ms": a count abbreviated and named, a measure with its unit.
  const costValue = (c, v) => (c.is_count ? `${millions(v)} ${c.short}` : `${fmt(v, c.decimals)} ${c.unit}`);
  const costText = (cost, v) => costValue(costOf(cost), v);
  const costsText = (profile) => COSTS.filter((c) => measured(profile, c)).map((c) => costValue(c, profile[c.name])).join(" · ");
  const kdText = (p) => HYPERPARAMETERS.filter((h) => typeof p[h.name] === "number")
    .map((h) => `${h.symbol}=${h.name === "learning_rate" ? sci(p[h.name]) : Number.isInteger(p[h.name]) ? p[h.name] : fmt(p[h.name], 2)}`).join(" ");
  const pointText = (metric, number, value, profile, params) => `#${number} ${metric} ${fmt(value)}<br>${shapeText(profile.shape)} · ` +
    `${costsText(profile)}<br>${kdText(params)}`;

  // Metric against a cost: every measured COMPLETE trial, the front highlighted (from the server), the teacher a star.
  async function drawPareto(base, summary, cost) {
    const study = summary.study;
    const metric = metricOf(study);
    const measured = summary.points.filter((t) => t.state === "COMPLETE" && t.value !== null && t.profile);
    const card = document.getElementById("pareto-card");
    // A cost axis means something only when trials differ in cost: the student's shape is searched, or the cost is
    // an objective. With one fixed shape every trial sits at one cost.
    const costMatters = (study.objectives || []).length > 1 || study.shape_searched;
    card.hidden = !costMatters || (!measured.length && (study.objectives || []).length < 2);
    if (card.hidden) return;
    // Front and dominated trials from one answer: the summary may be a moment older, and the two must agree.
    const pareto = await json(`${base}/pareto?cost=${cost}&dominated=true`);
    const others = pareto.dominated;
    document.getElementById("pareto-metric").textContent = metric;
    document.getElementById("pareto-info").textContent = `${pareto.front.length} of ${pareto.n_complete} complete trials on the front`;
    // The front card too, on the study's own cost axis: from this answer, so card and chart never disagree (the
    // summary that drew the card a moment ago may predate a trial that has just completed).
    if (study.front && cost === ((study.objectives || [])[1] || COSTS[0].name)) {
      document.getElementById("best").innerHTML = frontCard({...study, front: pareto.front}, metric);
    }
    const traces = [
      {x: others.map((p) => p.cost), y: others.map((p) => p.value), mode: "markers", name: "dominated trial", hoverinfo: "text",
       text: others.map((t) => pointText(metric, t.number, t.value, t.profile, t.params)), marker: {color: "#9aa5b1", size: 8}},
      {x: pareto.front.map((p) => p.cost), y: pareto.front.map((p) => p.value), mode: "lines+markers", name: "Pareto front", hoverinfo: "text",
       text: pareto.front.map((p) => pointText(metric, p.number, p.value, p.profile, p.params)), line: {shape: "hv", color: "#3563e9"},
       marker: {color: "#3563e9", size: 11, line: {color: "#1d2330", width: 1}}},
    ];
    const teacher = pareto.teacher_profile;
    if (teacher && pareto.teacher_metric !== null) {
      traces.push({x: [teacher[cost]], y: [pareto.teacher_metric], mode: "markers+text", name: "teacher", text: ["teacher"], textposition: "top center",
        hovertext: [`teacher ${metric} ${fmt(pareto.teacher_metric)}<br>${shapeText(teacher.shape)} · ${costsText(teacher)}`], hoverinfo: "text", marker: {symbol: "star", size: 16, color: "#1f9d55"}});
    }
    Plotly.react("pareto", traces, {...BASE, xaxis: {title: {text: costOf(cost).column}, type: costOf(cost).log_axis ? "log" : "linear"},
      yaxis: {title: {text: `eval ${metric}`}}}, PLOT);
  }

  function frontCard(study, metric) {
    const cost = (study.objectives || [])[1] || COSTS[0].name;
    const front = study.front || [];
    const c = costOf(cost);
    const flag = c.option;
    const pick = front.length ? front[front.length - 1] : null;  // ascending cost: the last is the most accurate
    const limit = pick ? (c.is_count ? Math.round(pick.cost) : pick.cost.toFixed(c.decimals)) : "N";
    return `<h2>Pareto front (${esc(metric)} against ${esc(c.column)})</h2><div class="big">${front.length} <span class="muted">trial${front.length === 1 ? "" : "s"} on the front</span></div>
      <table id="front-list"><tbody>${front.map((p) => `<tr><td><a href="${trialHref(study.name, p.number)}">#${p.number}</a></td><td class="num">${fmt(p.value)}</td><td class="num">${esc(costText(cost, p.cost))}</td>
        <td>${esc(shapeText(p.profile.shape))}</td></tr>`).join("")}</tbody></table>
      <p>no one best trial: pick one with <code>kdsearch export-best ${esc(study.name)} --out ./${esc(study.name)}-student ${flag} ${limit}</code> or <code>--trial N</code></p>`;
  }

  // A trial whose best epoch's outputs are degenerate (one class for every row, MCC or Pearson near 0): marked, its
  // reason on hover; export-best refuses it without --force.
  const degenerateBadge = (reason) => (reason ? `<span class="badge degenerate" title="${esc(reason)}">degenerate</span> ` : "");

  function studyPage(name) {
    const base = `/api/studies/${encodeURIComponent(name)}`;
    const table = {offset: 0, limit: 50, sort: "number", order: "desc", state: ""};
    let status = "queued";
    const drawTable = async () => {
      const q = new URLSearchParams({offset: table.offset, limit: table.limit, sort: table.sort, order: table.order});
      if (table.state) q.set("state", table.state);
      const page = await json(`${base}/trials?${q}`);
      document.getElementById("page-info").textContent = page.total ? `${table.offset + 1}–${Math.min(table.offset + table.limit, page.total)} of ${page.total}` : "no trials yet";
      document.getElementById("prev").disabled = table.offset === 0;
      document.getElementById("next").disabled = table.offset + table.limit >= page.total;
      document.querySelectorAll("#trials th[data-sort]").forEach((th) => th.classList.toggle("sorted", th.dataset.sort === table.sort));
      document.querySelector("#trials tbody").innerHTML = page.trials.map((t) => `<tr data-number="${t.number}">
        <td class="num"><a href="${trialHref(name, t.number)}">${t.number}</a></td><td><span class="badge ${esc(t.state)}">${esc(t.state)}</span></td>
        <td class="num">${fmt(t.value)}</td><td class="num">${t.best_epoch ?? ""}</td><td class="num">${t.epochs.length}</td>
        <td class="wrap hyper">${esc(kdText(t.params))}</td><td class="num">${fmt(t.duration_s, 1)}</td>
        <td>${esc(shapeText(t.profile && t.profile.shape))}</td>${COSTS.map((c) => `<td class="num">${measured(t.profile, c) ? esc(c.is_count ? millions(t.profile[c.name]) : fmt(t.profile[c.name], c.decimals)) : ""}</td>`).join("")}
        <td>${esc(t.precision || "")}</td><td class="wrap">${esc(t.worker || "")}</td>
        <td class="muted wrap">${degenerateBadge(t.degenerate)}${esc(t.stop_reason || t.fail_reason || "")}</td></tr>`).join("");
    };
    document.querySelectorAll("#trials th[data-sort]").forEach((th) => (th.onclick = () => {
      table.order = table.sort === th.dataset.sort && table.order === "desc" ? "asc" : "desc";
      table.sort = th.dataset.sort; table.offset = 0; drawTable();
    }));
    document.getElementById("prev").onclick = () => { table.offset = Math.max(0, table.offset - table.limit); drawTable(); };
    document.getElementById("next").onclick = () => { table.offset += table.limit; drawTable(); };
    document.getElementById("state-filter").onchange = (e) => { table.state = e.target.value; table.offset = 0; drawTable(); };
    document.getElementById("cancel").onclick = () => cancel(name);
    let lastSummary = null;
    let paretoCost = null;  // the study's second objective until the user picks another axis
    document.getElementById("pareto-cost").onchange = (e) => { paretoCost = e.target.value; if (lastSummary) drawPareto(base, lastSummary, paretoCost).catch(console.warn); };
    // The cost columns of the trials table and the chart's cost axes: one per cost of the registry.
    let costColumns = false;
    loop(async () => {
      await loadCosts();
      if (!costColumns) {
        costColumns = true;
        document.getElementById("shape-header").insertAdjacentHTML("afterend", COSTS.map((c) => `<th>${esc(c.short)}</th>`).join(""));
        document.getElementById("pareto-cost").innerHTML = COSTS.map((c) => `<option value="${esc(c.name)}">${esc(c.column)}</option>`).join("");
      }
      const summary = await changed(`${base}/summary`);
      if (summary === null) return active(status);  // nothing new since the last poll
      lastSummary = summary;
      const study = summary.study;
      const metric = metricOf(study);
      status = study.status;
      const withT = usesTemperature(study);
      document.getElementById("metric-header").textContent = metric;
      document.getElementById("curves-title").textContent = `Per-epoch eval ${metric} (dotted: pruned)`;
      document.getElementById("scatter-title").textContent = withT ? "Temperature × alpha" : "Learning rate × alpha";
      document.getElementById("notes").textContent = (study.notes || []).join(" ");
      document.title = `kdsearch: ${study.name}`;
      document.getElementById("name").textContent = study.name;
      document.getElementById("status").innerHTML = `<span class="badge ${esc(study.status)}">${esc(study.status)}</span>`;
      document.getElementById("cancel").hidden = !active(study.status);
      document.getElementById("progress-text").textContent = `${study.finished} / ${study.n_trials}`;
      document.getElementById("progress-bar").style.width = `${(100 * study.finished) / study.n_trials}%`;
      const c = study.counts;
      document.getElementById("counts").textContent = `complete ${c.complete} · pruned ${c.pruned} · running ${c.running} · waiting ${c.waiting} · failed ${c.failed}` +
        (study.teacher_metric !== null && study.teacher_metric !== undefined ? ` · teacher ${metric} ${fmt(study.teacher_metric)}` : "");
      document.getElementById("timing").textContent = `elapsed ${dur(summary.elapsed_s) || "-"}` + (summary.eta_s !== null ? ` · ETA ${dur(summary.eta_s)}` : "");
      document.getElementById("preparing").innerHTML = study.preparing ? `${prepBar(study.preparing)} ${prepText(study.preparing)}` :
        study.prepare_retry ? `<span class="error">${retryText(study.prepare_retry)}</span>` : "";
      document.getElementById("error").textContent = study.error || "";
      const b = study.best_trial;
      if (study.front) {
        document.getElementById("best").innerHTML = frontCard(study, metric);
      } else if (b) {
        const others = Object.entries(b.metrics || {}).filter(([k]) => k !== metric);
        document.getElementById("best").innerHTML = `<h2>Best trial</h2><div class="big">${fmt(b.value)} <span class="muted">${esc(metric)}</span></div>
          <p><a href="${trialHref(study.name, b.number)}">trial #${b.number}</a>, best epoch ${b.epoch ?? "?"}</p>
          ${b.degenerate ? `<p class="warn" id="best-degenerate">${degenerateBadge(b.degenerate)}${esc(b.degenerate)}: export-best refuses it without --force</p>` : ""}
          ${others.length ? `<p class="muted" id="best-metrics">${others.map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(" · ")}</p>` : ""}
          <p>${Object.entries(b.params).map(([k, v]) => `${esc(k)}=<b>${esc(typeof v === "number" && !Number.isInteger(v) ? sci(v) : v)}</b>`).join(" · ")}</p>
          <p><code>kdsearch export-best ${esc(study.name)} --out ./${esc(study.name)}-best</code></p>`;
        const r = study.seed_retrain;
        if (r) {
          document.getElementById("best").innerHTML += `<p id="seed-retrain">trial #${r.trial_number} retrained over ${r.seeds.length} seeds:
            <b>${fmt(r.mean)}</b>${r.std !== null ? ` ± ${fmt(r.std)}` : ""} (best seed ${r.best_seed})</p>`;
        }
      }
      drawTimeline(name, summary);
      const finished = summary.points.some((t) => t.value !== null && (t.state === "COMPLETE" || t.state === "PRUNED"));
      const noCharts = document.getElementById("no-charts");
      document.getElementById("charts").hidden = !finished;
      noCharts.hidden = finished;
      if (!finished) {
        noCharts.textContent = study.status === "failed" ? "The study failed before any trial finished (the error is above): there is nothing to chart." :
          study.status === "cancelled" ? "The study was cancelled before any trial finished: there is nothing to chart." :
          "No trial has finished yet: the charts appear with the first finished trial.";
        await drawTable();
        return active(study.status);
      }
      drawCharts(summary);
      if (paretoCost === null) {
        paretoCost = (study.objectives || [])[1] || COSTS[0].name;
        document.getElementById("pareto-cost").value = paretoCost;
      }
      await drawPareto(base, summary, paretoCost);
      await drawTable();
      const imp = await json(`${base}/importances`);
      const entries = Object.entries(imp.importances).sort((a, b) => a[1] - b[1]);
      Plotly.react("importances", [{type: "bar", orientation: "h", x: entries.map((e) => e[1]), y: entries.map((e) => e[0])}],
        {...BASE, margin: {t: 10, r: 10, b: 40, l: 120}, xaxis: {title: {text: entries.length ? `importance over ${imp.n_trials} complete trials` : "needs two complete trials"}}}, PLOT);
      // PED-ANOVA on a handful of trials ranks noise as readily as signal: say so below 10.
      const note = document.getElementById("importances-note");
      note.hidden = imp.n_trials >= IMPORTANCE_MIN_TRIALS;
      note.textContent = `Only ${imp.n_trials} complete trial${imp.n_trials === 1 ? "" : "s"}: importances from fewer than ${IMPORTANCE_MIN_TRIALS} are rough and may change as trials complete.`;
      return active(study.status);
    });
  }

  // ------------------------------------------------------------------------------------------- timeline
  // Which worker ran which trial when: one row per worker, a bar per trial from its start to its end (Optuna's
  // stamps, on the worker's clock); a running trial's bar ends at the latest stamp of the study. Click: the trial.
  const STATE_COLOURS = {COMPLETE: "#1f9d55", PRUNED: "#c27c0e", FAIL: "#c53030", RUNNING: "#3563e9", WAITING: "#9aa5b1"};
  function drawTimeline(name, summary) {
    const ran = summary.points.filter((t) => t.started_at);
    const card = document.getElementById("timeline-card");
    card.hidden = !ran.length;
    if (!ran.length) return;
    const ms = (s) => new Date(s).getTime();
    const latest = Math.max(...ran.flatMap((t) => [ms(t.started_at), t.completed_at ? ms(t.completed_at) : 0]));
    const states = [...new Set(ran.map((t) => t.state))];
    Plotly.react("timeline", states.map((state) => {
      const rows = ran.filter((t) => t.state === state);
      return {type: "bar", orientation: "h", name: state, base: rows.map((t) => t.started_at), y: rows.map((t) => t.worker || "?"),
        x: rows.map((t) => Math.max((t.completed_at ? ms(t.completed_at) : latest) - ms(t.started_at), 1)),
        customdata: rows.map((t) => t.number), text: rows.map((t) => `#${t.number}`), textposition: "inside", insidetextanchor: "middle",
        hovertemplate: rows.map((t) => `trial #${t.number} ${state}<br>${esc(t.worker || "")}<br>${t.started_at} → ${t.completed_at || "running"}<extra></extra>`),
        marker: {color: STATE_COLOURS[state] || "#9aa5b1"}};
    }), {...BASE, barmode: "overlay", margin: {t: 30, r: 10, b: 45, l: 10},
      legend: {orientation: "h", x: 1, xanchor: "right", y: 1, yanchor: "bottom"}, xaxis: {type: "date", title: {text: "time (worker clock)"}},
      yaxis: {automargin: true, type: "category"}, height: Math.max(160, 60 + 40 * new Set(ran.map((t) => t.worker)).size)}, PLOT);
    const chart = document.getElementById("timeline");
    if (!chart.dataset.linked) {
      chart.dataset.linked = "1";
      chart.on("plotly_click", (e) => { if (e.points.length) location.href = trialHref(name, e.points[0].customdata); });
    }
  }

  // ------------------------------------------------------------------------------------------- trial page
  const stamp = (s) => (s ? s.replace("T", " ").slice(0, 19) : "");  // Optuna's stamps: the worker's clock, no zone
  function trialPage(study, number) {
    const url = `/api/studies/${encodeURIComponent(study)}/trials/${number}`;
    const link = document.getElementById("study-link");
    link.href = `/studies/${encodeURIComponent(study)}`;
    link.textContent = study;
    document.getElementById("number").textContent = `#${number}`;
    document.title = `kdsearch: ${study} trial #${number}`;
    document.getElementById("copy").onclick = async () => {
      const code = document.getElementById("export-command");
      const out = document.getElementById("copied");
      try {
        await navigator.clipboard.writeText(code.textContent);
        out.textContent = "copied";
      } catch {  // no clipboard outside a secure context (plain http on another host): select it for Ctrl-C
        const range = document.createRange();
        range.selectNodeContents(code);
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        out.textContent = "selected: press Ctrl-C";
      }
    };
    loop(async () => {
      await loadCosts();
      const t = await json(url);
      const metric = t.metric || "score";
      document.getElementById("state").innerHTML = `<span class="badge ${esc(t.state)}">${esc(t.state)}</span>`;
      document.getElementById("value").innerHTML = t.value !== null ? `${fmt(t.value)} <span class="muted">${esc(metric)}</span>` : `<span class="muted">no ${esc(metric)} yet</span>`;
      const facts = [["best epoch", t.best_epoch], ["epochs run", t.epochs.length], ["duration", t.duration_s !== null ? `${fmt(t.duration_s, 1)} s` : ""],
        ["worker", t.worker], ["started", stamp(t.started_at)], ["finished", stamp(t.completed_at)], ["precision", t.precision],
        ["shape", shapeText(t.profile && t.profile.shape)],
        ...COSTS.map((c) => [c.title, measured(t.profile, c) ? costValue(c, t.profile[c.name]) : ""]),
        ["measured on", t.profile ? t.profile.machine : ""],
        ["stop reason", t.stop_reason], ["degenerate", t.degenerate], ...Object.entries(t.metrics).map(([k, v]) => [`${k} (best epoch)`, fmt(v)])];
      document.querySelector("#facts tbody").innerHTML = facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
        .map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join("");
      document.getElementById("fail-reason").textContent = t.fail_reason || "";
      document.querySelector("#params tbody").innerHTML = Object.entries(t.params)
        .map(([k, v]) => `<tr><th>${esc(k)}</th><td class="num">${esc(typeof v === "number" && !Number.isInteger(v) ? sci(v) : v)}</td></tr>`).join("");
      document.getElementById("export-line").hidden = !t.export_command;
      document.getElementById("no-export").hidden = !!t.export_command;
      document.getElementById("export-command").textContent = t.export_command || "";
      document.getElementById("exports").innerHTML = t.exports.length ? `<p class="muted">exported before:</p><ul>${t.exports.map((e) =>
        `<li>seed ${e.seed} to <code>${esc(e.out_dir)}</code> at ${esc(e.exported_at)}</li>`).join("")}</ul>` : "";
      // Per-epoch curves: the metric on the left axis, the losses on the right; a single epoch draws as markers.
      const epochs = t.epochs;
      const mode = epochs.length > 1 ? "lines+markers" : "markers";
      const xs = epochs.map((e) => e.epoch);
      const traces = [{x: xs, y: epochs.map((e) => e.score), mode, name: `eval ${metric}`}];
      for (const loss of ["train_loss", "eval_loss"]) {
        if (epochs.some((e) => e[loss] !== null && e[loss] !== undefined)) {
          traces.push({x: xs, y: epochs.map((e) => e[loss]), mode, name: loss.replace("_", " "), yaxis: "y2", line: {dash: "dot"}});
        }
      }
      Plotly.react("epoch-chart", traces, {...BASE, xaxis: {title: {text: "epoch"}, dtick: 1}, yaxis: {title: {text: `eval ${metric}`}},
        yaxis2: {title: {text: "loss"}, overlaying: "y", side: "right"}}, PLOT);
      const names = [...new Set(epochs.flatMap((e) => Object.keys(e.metrics)))];
      document.querySelector("#epochs thead").innerHTML = `<tr><th>Epoch</th><th>${esc(metric)}</th>${names.filter((k) => k !== metric).map((k) => `<th>${esc(k)}</th>`).join("")}
        <th>Train loss</th><th>Eval loss</th><th>Seconds</th></tr>`;
      document.querySelector("#epochs tbody").innerHTML = epochs.map((e) => `<tr${e.epoch === t.best_epoch ? ' class="best"' : ""}><td class="num">${e.epoch}</td>
        <td class="num">${fmt(e.score)}</td>${names.filter((k) => k !== metric).map((k) => `<td class="num">${fmt(e.metrics[k])}</td>`).join("")}
        <td class="num">${fmt(e.train_loss)}</td><td class="num">${fmt(e.eval_loss)}</td><td class="num">${fmt(e.seconds, 2)}</td></tr>`).join("");
      document.getElementById("log").textContent = t.log.length ? t.log.map((l) => `${new Date(l.at).toLocaleTimeString()} ${l.level.padEnd(7)} ${l.message}`).join("\n") :
        "(no lines recorded: the trial ran before workers kept them)";
      document.querySelector("#artifacts tbody").innerHTML = t.artifacts.map((a) => `<tr><td>${esc(a.kind)}</td><td>${esc(a.filename)}</td>
        <td><code>${esc(a.artifact_id)}</code></td><td>${esc(a.mimetype)}</td></tr>`).join("") || `<tr><td colspan="4" class="muted">none stored</td></tr>`;
      return t.state === "RUNNING" || t.state === "WAITING";
    });
  }

  return {studiesPage, studyPage, workersPage, trialPage};
})();
