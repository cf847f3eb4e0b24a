/* safetynet dashboard: the admin's theme, row selection, and live figures. No framework; see docs/dashboard.md. */
(function () {
  "use strict";

  /* The admin keeps its theme choice ("auto", "light" or "dark") in localStorage under "theme": follow it. */
  try {
    var theme = window.localStorage.getItem("theme");
    if (theme === "light" || theme === "dark") { document.documentElement.setAttribute("data-theme", theme); }
  } catch (ignored) { /* storage refused: the system's choice applies */ }

  function all(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }

  /* Checkboxes: "select all" and the bulk bar's count; its buttons only work with a selection. */
  function selection() {
    var boxes = all("input[name=ids]");
    var picked = boxes.filter(function (box) { return box.checked; }).length;
    all("[data-selected-count]").forEach(function (element) { element.textContent = String(picked); });
    all("button[data-needs-selection]").forEach(function (button) { button.disabled = picked === 0; });
    all("input[data-select-all]").forEach(function (box) {
      box.checked = picked > 0 && picked === boxes.length;
      box.indeterminate = picked > 0 && picked < boxes.length;
    });
  }

  function wireSelection() {
    all("input[data-select-all]").forEach(function (box) {
      box.addEventListener("change", function () {
        all("input[name=ids]").forEach(function (row) { row.checked = box.checked; });
        selection();
      });
    });
    all("input[name=ids]").forEach(function (box) { box.addEventListener("change", selection); });
    selection();
  }

  /* Live figures: the page names a small JSON endpoint (data-live); each element with data-figure="key" shows
     figures[key]. Polling pauses while the tab is hidden and stops when the endpoint says so (done). */
  function wireLive() {
    var url = document.body.getAttribute("data-live");
    if (!url || !window.fetch) { return; }
    var interval = parseInt(document.body.getAttribute("data-live-interval"), 10) || 5000;
    var timer = null;
    var failures = 0;
    var stopped = false;
    var stamp = document.querySelector("[data-live-stamp]");

    function apply(data) {
      var fragments = data.fragments || {};  /* rows drawn by the server (escaped there), replaced whole */
      Object.keys(fragments).forEach(function (id) {
        var element = document.getElementById(id);
        if (element) { element.innerHTML = fragments[id]; }
      });
      var figures = data.figures || {};
      Object.keys(figures).forEach(function (key) {
        all('[data-figure="' + key.replace(/"/g, "") + '"]').forEach(function (element) {
          var value = figures[key];
          element.textContent = value === null || value === undefined ? "unknown" : String(value);
        });
      });
      var states = data.states || {};
      Object.keys(states).forEach(function (key) {
        all('[data-state-of="' + key.replace(/"/g, "") + '"]').forEach(function (element) {
          var state = String(states[key]);
          element.setAttribute("data-state", state);
          element.className = element.className.replace(/\bstate-\S+/g, "").trim() + " state-" + state;
        });
      });
      var links = data.links || {};
      Object.keys(links).forEach(function (key) {
        all('[data-link-of="' + key.replace(/"/g, "") + '"]').forEach(function (element) {
          var link = links[key];
          element.hidden = !link;
          if (link) { element.setAttribute("href", link.url); element.textContent = link.text; }
        });
      });
      if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
      if (data.done) { stopped = true; }
    }

    function schedule(delay) {
      window.clearTimeout(timer);
      if (!stopped && !document.hidden) { timer = window.setTimeout(tick, delay); }
    }

    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.json();
        })
        .then(function (data) { failures = 0; apply(data); schedule(interval); })
        .catch(function () {
          failures += 1;
          if (stamp) { stamp.textContent = "not updated: the server did not answer"; }
          schedule(Math.min(60000, interval * Math.pow(2, failures)));
        });
    }

    document.addEventListener("visibilitychange", function () {
      if (document.hidden) { window.clearTimeout(timer); } else { schedule(0); }
    });
    schedule(interval);
  }

  function start() { wireSelection(); wireLive(); }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
