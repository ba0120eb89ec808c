// kdsearch dashboard: polls the REST API and redraws; no build step, no CDN.
const kd = (() => {
  const REFRESH_MS = 2000;
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v, d = 4) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
  const sci = (v) => (v === null || v === undefined ? "" : Number(v).toPrecision(3));
  // With KDSEARCH_API_TOKEN set (and reads not public), the API answers 401 until the token is given once.
  const auth = () => { const t = localStorage.getItem("kdsearch-token"); return t ? {Authorization: `Bearer ${t}`} : {}; };
  const json = async (url) => {
    let r = await fetch(url, {headers: auth()});
    if (r.status === 401) {
      const token = window.prompt("kdsearch API token");
      if (token) { localStorage.setItem("kdsearch-token", token); r = await fetch(url, {headers: auth()}); }
    }
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.json();
  };
  const active = (s) => s === "queued" || s === "running";

  async function studiesPage() {
    const draw = async () => {
      const studies = await json("/api/studies");
      document.querySelector("#studies tbody").innerHTML = studies.map((s) => {
        const pct = Math.round((100 * s.finished) / s.n_trials);
        return `<tr><td><a href="/studies/${encodeURIComponent(s.name)}">${esc(s.name)}</a></td>
          <td><span class="badge ${esc(s.status)}">${esc(s.status)}</span></td><td class="num">${s.priority}</td>
          <td><span class="progress"><div style="width:${pct}%"></div></span> ${s.finished}/${s.n_trials}</td>
          <td class="num">${s.counts.complete}</td><td class="num">${s.counts.pruned}</td><td class="num">${s.counts.running}</td>
          <td class="num">${s.counts.failed}</td><td class="num">${fmt(s.best_value)}</td>
          <td>${new Date(s.created_at).toLocaleString()}</td><td class="error">${esc(s.error || "")}</td></tr>`;
      }).join("");
      const workers = await json("/api/workers");
      document.querySelector("#workers tbody").innerHTML = workers.map((w) => `<tr><td>${esc(w.id)}</td><td>${esc(w.device)}</td>
        <td>${esc(w.status)}</td><td>${w.current_study_id ?? ""}</td><td>${w.current_trial_number ?? ""}</td>
        <td class="num">${w.heartbeat_age_s}</td></tr>`).join("");
      document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    };
    const loop = async () => { try { await draw(); } catch (e) { console.warn(e); } setTimeout(loop, REFRESH_MS); };
    loop();
  }

  function drawCharts(study, trials) {
    const done = trials.filter((t) => t.value !== null).sort((a, b) => a.number - b.number);
    let best = -Infinity;
    const bestLine = done.map((t) => (best = Math.max(best, t.state === "COMPLETE" ? t.value : best)));
    const traces = [
      {x: done.map((t) => t.number), y: done.map((t) => t.value), mode: "markers", name: "trial",
       marker: {color: done.map((t) => (t.state === "PRUNED" ? "#c27c0e" : "#3563e9"))},
       text: done.map((t) => `${t.state} lr=${sci(t.params.learning_rate)} T=${fmt(t.params.temperature, 2)} a=${fmt(t.params.alpha, 2)}`)},
      {x: done.map((t) => t.number), y: bestLine.map((v) => (v === -Infinity ? null : v)), mode: "lines", name: "best so far", line: {shape: "hv"}},
    ];
    const shapes = study.teacher_accuracy ? [{type: "line", xref: "paper", x0: 0, x1: 1, y0: study.teacher_accuracy, y1: study.teacher_accuracy, line: {dash: "dot", color: "#1f9d55"}}] : [];
    const layout = {margin: {t: 10, r: 10, b: 40, l: 50}, xaxis: {title: {text: "trial"}}, yaxis: {title: {text: "eval accuracy"}}, shapes, legend: {orientation: "h"}};
    Plotly.react("history", traces, layout, {displayModeBar: false, responsive: true});
    const curves = trials.filter((t) => t.epochs.length).map((t) => ({
      x: t.epochs.map((e) => e.epoch), y: t.epochs.map((e) => e.eval_accuracy), mode: "lines+markers", name: `#${t.number}`,
      line: {dash: t.state === "PRUNED" ? "dot" : "solid", width: 1.5}, marker: {size: 4}}));
    Plotly.react("curves", curves, {...layout, xaxis: {title: {text: "epoch"}, dtick: 1}, showlegend: false}, {displayModeBar: false, responsive: true});
  }

  async function studyPage(name) {
    const draw = async () => {
      const study = await json(`/api/studies/${encodeURIComponent(name)}`);
      const page = await json(`/api/studies/${encodeURIComponent(name)}/trials`);
      document.title = `kdsearch: ${study.name}`;
      document.getElementById("name").textContent = study.name;
      document.getElementById("status").innerHTML = `<span class="badge ${esc(study.status)}">${esc(study.status)}</span>`;
      document.getElementById("progress-text").textContent = `${study.finished} / ${study.n_trials}`;
      document.getElementById("progress-bar").style.width = `${(100 * study.finished) / study.n_trials}%`;
      const c = study.counts;
      document.getElementById("counts").textContent = `complete ${c.complete} · pruned ${c.pruned} · running ${c.running} · waiting ${c.waiting} · failed ${c.failed}` +
        (study.teacher_accuracy ? ` · teacher accuracy ${fmt(study.teacher_accuracy)}` : "");
      document.getElementById("error").textContent = study.error || "";
      const b = study.best_trial;
      if (b) {
        document.getElementById("best").innerHTML = `<h2>Best trial</h2><div class="big">${fmt(b.value)}</div>
          <p>trial #${b.number}, best epoch ${b.epoch ?? "?"}</p>
          <p>${Object.entries(b.params).map(([k, v]) => `${esc(k)}=<b>${esc(typeof v === "number" && !Number.isInteger(v) ? sci(v) : v)}</b>`).join(" · ")}</p>
          <p><code>kdsearch export-best ${esc(study.name)} --out ./${esc(study.name)}-best</code></p>`;
      }
      const trials = page.trials;
      document.querySelector("#trials tbody").innerHTML = trials.slice().sort((a, b) => b.number - a.number).map((t) => `<tr>
        <td class="num">${t.number}</td><td><span class="badge ${esc(t.state)}">${esc(t.state)}</span></td>
        <td class="num">${fmt(t.value)}</td><td class="num">${t.best_epoch ?? ""}</td><td class="num">${t.epochs.length}</td>
        <td class="num">${sci(t.params.learning_rate)}</td><td class="num">${fmt(t.params.temperature, 2)}</td>
        <td class="num">${fmt(t.params.alpha, 3)}</td><td class="num">${t.params.num_train_epochs ?? ""}</td>
        <td class="num">${t.params.batch_size ?? ""}</td><td class="num">${fmt(t.duration_s, 1)}</td><td>${esc(t.worker || "")}</td></tr>`).join("");
      drawCharts(study, trials);
      return active(study.status);
    };
    const loop = async () => {
      let again = true;
      try { again = await draw(); } catch (e) { console.warn(e); }
      setTimeout(loop, again ? REFRESH_MS : 5 * REFRESH_MS);
    };
    loop();
  }

  return {studiesPage, studyPage};
})();
