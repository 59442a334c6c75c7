// quantgate operator page: submit, watch (SSE), report, cancel, validate. Plain JavaScript, no
// dependencies; every call goes to the public /v1 API with the token kept in sessionStorage.
"use strict";
(() => {
  const TOKEN_KEY = "quantgate.token";
  const STAGES = ["plan", "calibrate", "quantize", "write", "validate", "finalize", "upload"];
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const REFRESH_MS = 3000;
  const $ = (id) => document.getElementById(id);
  let current = null; // {id, job, controller}

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  function headers(extra) {
    const result = Object.assign({}, extra || {});
    if (token()) result.Authorization = "Bearer " + token();
    return result;
  }

  function notice(text, isError) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
    box.classList.toggle("error", Boolean(isError));
  }

  function errorText(body, response) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && body.message) return body.message;
    return "HTTP " + response.status;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    if (response.status === 401) {
      notice("This server needs an API token: enter it at the top right.", true);
      throw new Error("missing or invalid API token");
    }
    return response;
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(errorText(body, response));
    return body;
  }

  // ---- job list (server-rendered rows, refreshed as a fragment) ----
  async function refreshJobs() {
    try {
      const response = await api("/ui/jobs");
      if (!response.ok) return;
      $("jobs-body").innerHTML = await response.text();
      markSelected();
    } catch (err) { /* the notice already says why */ }
  }

  function markSelected() {
    for (const row of document.querySelectorAll("#jobs-body tr[data-job]")) {
      row.classList.toggle("selected", Boolean(current) && row.dataset.job === current.id);
    }
  }

  // ---- submit ----
  function jobBody() {
    const value = (id) => $(id).value.trim();
    const body = {
      source: value("source"),
      recipe: value("recipe"),
      calibration: {
        data: value("calib-data") || "random",
        samples: Number(value("calib-samples")),
        seq_len: Number(value("calib-seq-len")),
        batch_size: Number(value("calib-batch-size")),
      },
    };
    if (value("revision")) body.revision = value("revision");
    if (value("dialect")) body.dialect = value("dialect");
    const exclude = value("exclude").split(",").map((p) => p.trim()).filter(Boolean);
    if (exclude.length) body.exclude = exclude;
    if (value("push-repo")) {
      body.push_to_hub = { repo_id: value("push-repo"), private: $("push-private").checked };
      if (value("push-revision")) body.push_to_hub.revision = value("push-revision");
    }
    return body;
  }

  async function submitJob(event) {
    event.preventDefault();
    $("submit-state").textContent = "submitting…";
    try {
      const job = await apiJson("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(jobBody()),
      });
      $("submit-state").textContent = "submitted " + job.id;
      notice("");
      watch(job.id);
      refreshJobs();
    } catch (err) {
      $("submit-state").textContent = "";
      notice("Not submitted: " + err.message, true);
    }
  }

  // ---- watch one job ----
  function overall(stage, fraction, job) {
    const stages = job && job.params && job.params.push_to_hub ? STAGES : STAGES.slice(0, -1);
    const index = stages.indexOf(stage);
    if (index < 0) return null;
    return Math.min(1, (index + (fraction == null ? 0 : fraction)) / stages.length);
  }

  function setProgress(stage, fraction) {
    const value = overall(stage, fraction, current && current.job);
    if (value != null) $("watch-progress").value = value;
    const pct = fraction == null ? "" : " " + Math.round(fraction * 100) + "%";
    $("watch-stage").textContent = stage ? stage + pct : "";
  }

  function renderJob(job) {
    current.job = job;
    const status = $("watch-status");
    status.textContent = job.status;
    status.className = "status " + job.status;
    $("watch-source").textContent = job.recipe + " (" + job.dialect + ") of " + job.source;
    if (job.status === "succeeded") {
      $("watch-progress").value = 1;
      $("watch-stage").textContent = "done";
    } else if (job.progress) {
      setProgress(job.progress.stage, job.progress.fraction);
    }
    const error = $("watch-error");
    error.hidden = !job.error;
    error.textContent = job.error ? job.error.code + ": " + job.error.message : "";
    const publish = $("watch-publish");
    publish.hidden = !job.publish;
    if (job.publish) {
      publish.innerHTML = "";
      publish.append("Pushed to ");
      const link = document.createElement("a");
      link.href = job.publish.commit_url;
      link.textContent = job.publish.repo_id + " @ " + job.publish.commit.slice(0, 12);
      publish.append(link);
    }
    $("report-button").disabled = !job.report_url;
    $("report-tab-button").disabled = !job.report_url;
    $("cancel-button").disabled = TERMINAL.has(job.status);
  }

  function appendEvent(event) {
    const item = document.createElement("li");
    item.className = event.level;
    const when = new Date(event.created_at * 1000).toLocaleTimeString();
    item.textContent = when + " [" + event.type + "] " + event.message;
    $("events").append(item);
    $("events").scrollTop = $("events").scrollHeight;
  }

  function onFrame(frame) {
    const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (!data) return;
    const event = JSON.parse(data);
    appendEvent(event);
    if (event.type === "progress") setProgress(event.data.stage, event.data.fraction);
    if (event.type === "status" && event.data.status) {
      $("watch-status").textContent = event.data.status;
      $("watch-status").className = "status " + event.data.status;
    }
  }

  async function stream(id, controller) {
    try {
      const response = await fetch("/v1/jobs/" + encodeURIComponent(id) + "/events", {
        headers: headers({ Accept: "text/event-stream" }),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      notice("Event stream of " + id + " stopped: " + err.message, true);
    }
    if (current && current.id === id) {
      renderJob(await apiJson("/v1/jobs/" + encodeURIComponent(id)));
      refreshJobs();
    }
  }

  async function watch(id) {
    if (current && current.controller) current.controller.abort();
    const controller = new AbortController();
    current = { id: id, job: null, controller: controller };
    history.replaceState(null, "", "#job=" + encodeURIComponent(id));
    $("watch").hidden = false;
    $("watch-id").textContent = id;
    $("events").innerHTML = "";
    $("watch-progress").value = 0;
    $("watch-stage").textContent = "";
    $("report-frame").hidden = true;
    markSelected();
    try {
      renderJob(await apiJson("/v1/jobs/" + encodeURIComponent(id)));
    } catch (err) {
      notice("Cannot open job " + id + ": " + err.message, true);
      return;
    }
    $("watch").scrollIntoView({ block: "start" });
    stream(id, controller);
  }

  async function reportHtml() {
    const response = await api(current.job.report_url, { headers: { Accept: "text/html" } });
    if (!response.ok) throw new Error("no report: HTTP " + response.status);
    return response.text();
  }

  async function openReport() {
    try {
      const frame = $("report-frame");
      frame.srcdoc = await reportHtml();
      frame.hidden = false;
      frame.scrollIntoView({ block: "start" });
    } catch (err) { notice(err.message, true); }
  }

  async function reportInTab() {
    try {
      const blob = new Blob([await reportHtml()], { type: "text/html" });
      window.open(URL.createObjectURL(blob), "_blank", "noopener");
    } catch (err) { notice(err.message, true); }
  }

  async function cancelJob(id) {
    try {
      const job = await apiJson("/v1/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
      if (current && current.id === id) renderJob(job);
      refreshJobs();
    } catch (err) { notice("Cancel failed: " + err.message, true); }
  }

  // ---- validate ----
  async function validate(event) {
    event.preventDefault();
    const path = $("validate-path").value.trim();
    const repo = $("validate-repo").value.trim();
    const body = path ? { path: path } : { hub_repo: repo };
    if (!path && $("validate-revision").value.trim()) body.revision = $("validate-revision").value.trim();
    $("validate-state").textContent = "validating…";
    try {
      const result = await apiJson("/v1/validations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const verdicts = Object.entries(result.verdicts).map(([engine, v]) => engine + ": " + v.status);
      $("validation-verdicts").textContent = (result.ok ? "ok" : "errors found") + " · " + verdicts.join(" · ");
      $("validation-verdicts").className = result.ok ? "succeeded" : "failed";
      const page = await api("/v1/validations/" + encodeURIComponent(result.id), { headers: { Accept: "text/html" } });
      $("validation-frame").srcdoc = await page.text();
      $("validation-result").hidden = false;
      $("validate-state").textContent = result.id;
    } catch (err) {
      $("validate-state").textContent = "";
      notice("Validation failed: " + err.message, true);
    }
  }

  // ---- wiring ----
  function showTokenState() {
    $("token-state").textContent = token() ? "token set for this tab" : "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      $("token").value = "";
      showTokenState();
      notice("");
      refreshJobs();
    });
    $("submit-form").addEventListener("submit", submitJob);
    $("validate-form").addEventListener("submit", validate);
    $("refresh").addEventListener("click", refreshJobs);
    $("report-button").addEventListener("click", openReport);
    $("report-tab-button").addEventListener("click", reportInTab);
    $("cancel-button").addEventListener("click", () => current && cancelJob(current.id));
    $("jobs-body").addEventListener("click", (event) => {
      const button = event.target.closest("[data-action]");
      if (!button) return;
      event.preventDefault();
      const id = button.closest("tr").dataset.job;
      if (button.dataset.action === "watch") watch(id);
      if (button.dataset.action === "cancel") cancelJob(id);
      if (button.dataset.action === "report") watch(id).then(openReport);
    });
    showTokenState();
    const match = location.hash.match(/^#job=(.+)$/);
    if (match) watch(decodeURIComponent(match[1]));
    if (document.body.dataset.auth === "required" && !token()) {
      notice("This server needs an API token: enter it at the top right.", true);
    } else if (document.body.dataset.auth === "required") {
      refreshJobs();
    }
    setInterval(() => { if (!document.hidden) refreshJobs(); }, REFRESH_MS);
  });
})();
