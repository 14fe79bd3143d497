// The console's only script: live refresh of server-rendered fragments, sample search, labelling keys.
// Everything shown is rendered (and escaped) by the server; this file never builds HTML from data.
"use strict";

const REFRESH_MS = 5000;

function refreshFragments() {
  document.querySelectorAll("[data-refresh]").forEach((element) => {
    setInterval(async () => {
      if (document.hidden) return;
      try {
        const response = await fetch(element.dataset.refresh, {credentials: "same-origin"});
        if (response.ok) element.innerHTML = await response.text();  // server-escaped HTML
      } catch (error) { /* offline for a moment: the next tick tries again */ }
    }, REFRESH_MS);
  });
}

function sampleSearch() {
  const input = document.getElementById("sample-search");
  if (!input) return;
  const count = document.getElementById("sample-count");
  const filter = () => {
    const needle = input.value.trim().toLowerCase();
    let shown = 0;
    document.querySelectorAll("tr.sample").forEach((row) => {
      const match = !needle || row.textContent.toLowerCase().includes(needle);
      row.hidden = !match;
      if (match) shown += 1;
    });
    count.textContent = needle ? `${shown} matching` : "";
  };
  input.addEventListener("input", filter);
}

function labelling() {
  const root = document.getElementById("labelling");
  if (!root) return;
  const pairs = Array.from(root.querySelectorAll("section.pair"));
  const status = document.getElementById("label-status");
  const progress = document.getElementById("label-progress");
  let index = 0;
  let labelled = Number(progress.dataset.existing);
  let busy = false;

  const position = document.getElementById("pair-position");
  const show = () => {
    pairs.forEach((pair, i) => { pair.hidden = i !== index; });
    if (position && index < pairs.length) position.textContent = `pair ${index + 1} of ${pairs.length}`;
    if (pairs.length && index >= pairs.length) status.textContent = "All pairs done. Thank you!";
  };
  const next = () => { index += 1; show(); };

  async function send(choice) {
    const pair = pairs[index];
    if (!pair || busy) return;
    busy = true;
    const candidates = pair.querySelectorAll(".candidate");
    const body = {
      namespace: root.dataset.namespace,
      run: root.dataset.run,
      prompt: pair.querySelector(".prompt").textContent,
      responses: Array.from(candidates).map((c) => ({text: c.querySelector(".response").textContent,
                                                     source: c.dataset.source})),
      choice: choice,
      round: Number(root.dataset.round || 0),  // the open human-feedback round these candidates are from
    };
    try {
      const response = await fetch("/api/labels", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-Requested-With": "ftconsole"},
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      if (!response.ok) {
        status.textContent = `Not saved (${response.status}): ${answer.error}`;
        status.className = "error";
        return;
      }
      labelled += 1;
      progress.textContent = `${labelled} labels so far`;
      status.textContent = `Saved ${choice} as ${answer.name}.`;
      status.className = "";
      next();
    } finally {
      busy = false;
    }
  }

  const keys = {"1": "a", "2": "b", "t": "tie", "b": "bothBad"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "INPUT") return;
    if (keys[event.key]) { event.preventDefault(); send(keys[event.key]); }
    else if (event.key === "s") { event.preventDefault(); next(); }
  });
  show();
}

document.addEventListener("DOMContentLoaded", () => { refreshFragments(); sampleSearch(); labelling(); });
