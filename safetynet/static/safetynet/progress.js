/* safetynet progress widget: polls the progress endpoint, no framework. See docs/progress.md. */
(function () {
  "use strict";

  /* After a failure, how long the widget keeps asking (less and less often) whether staff replayed the task. */
  var WATCH_AFTER_FAILURE_MS = 30 * 60 * 1000;
  var WATCH_LONGEST_WAIT_MS = 60 * 1000;

  function show(element, visible) { if (element) { element.hidden = !visible; } }
  function say(element, text) { if (element) { element.textContent = text; } }  /* text, never HTML */

  /* A result link only to this site or over http(s): never a javascript: or data: address. */
  function safeLink(url) {
    if (typeof url !== "string") { return null; }
    if (/^\/(?!\/)/.test(url) || /^https?:\/\//i.test(url)) { return url; }
    return null;
  }

  function counted(widget, data) {
    if (!data.total) { return ""; }
    var unit = widget.getAttribute("data-unit");
    var current = Math.floor(data.current || 0);
    return current + " of " + Math.round(data.total) + (unit ? " " + unit : "") + " done";
  }

  function render(widget, data) {
    var bar = widget.querySelector(".safetynet-progress-bar");
    var message = widget.querySelector(".safetynet-progress-message");
    var done = widget.querySelector(".safetynet-progress-done");
    var error = widget.querySelector(".safetynet-progress-error");
    var result = widget.querySelector(".safetynet-progress-result");
    var reference = widget.querySelector(".safetynet-progress-reference");
    widget.setAttribute("data-state", data.state);
    show(result, false); show(reference, false);
    if (data.state === "succeeded") {
      show(bar, false); show(message, false); show(error, false);
      var text = widget.querySelector(".safetynet-progress-done-text");
      say(text, data.message || "Done");
      show(done, true);
      var link = data.result && typeof data.result === "object" ? safeLink(data.result.url) : null;
      if (result && link) {
        result.setAttribute("href", link);
        say(result, data.result.label || "Open the result");
        show(result, true);
      }
      return;
    }
    if (data.state === "failed") {
      show(bar, false); show(message, false); show(done, false);
      say(error, data.error || "Sorry, this did not work.");
      show(error, true);
      /* What to quote to the team: the task id, which finds its dead letter on the dashboard. */
      say(widget.querySelector(".safetynet-progress-reference-id"), widget.getAttribute("data-task-id"));
      show(reference, true);
      return;
    }
    show(bar, true); show(message, true); show(done, false); show(error, false);
    if (bar && data.total) {
      bar.max = data.total;
      bar.value = data.current || 0;
    } else if (bar) {
      bar.removeAttribute("value");  /* indeterminate */
    }
    var words = data.message || (data.state === "queued" ? "Waiting to start…" : "Working…");
    var progress = counted(widget, data);
    if (data.state === "retrying") {
      words = "Trying again (attempt " + data.attempt + ")" + (data.message ? ": " + data.message : "");
    } else if (progress) {
      words = words + " · " + progress;
    }
    say(message, words);
  }

  /* The task failed and staff replayed it: watch the replay instead, under its new task id. */
  function follow(widget, data) {
    widget.setAttribute("data-url", data.replayed_url);
    widget.setAttribute("data-task-id", data.replayed_as);
    render(widget, { state: "queued", message: "Trying again…", done: false });
    widget.dispatchEvent(new CustomEvent("safetynet:replayed", {
      bubbles: true, detail: { taskId: data.task_id, replayedAs: data.replayed_as }
    }));
  }

  function poll(widget) {
    var interval = parseInt(widget.getAttribute("data-interval"), 10) || 1000;
    var failures = 0;
    var watchUntil = null;  /* set when a failure is first seen */
    var watchWait = interval;
    function again(delay) { window.setTimeout(tick, delay); }
    function tick() {
      fetch(widget.getAttribute("data-url"), { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) {
          if (response.status === 404 || response.status === 403) {
            widget.setAttribute("data-state", "unknown");
            say(widget.querySelector(".safetynet-progress-message"), "This task cannot be found.");
            show(widget.querySelector(".safetynet-progress-bar"), false);
            return null;
          }
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.json();
        })
        .then(function (data) {
          if (data === null) { return; }
          failures = 0;
          if (data.replayed_url && data.replayed_as) {
            follow(widget, data);
            watchUntil = null;
            watchWait = interval;
            again(0);
            return;
          }
          render(widget, data);
          if (!data.done) { again(interval); return; }
          if (data.state === "failed") {  /* staff may replay it: ask now and then, for a while */
            var now = Date.now();
            if (watchUntil === null) { watchUntil = now + WATCH_AFTER_FAILURE_MS; }
            if (now < watchUntil) {
              watchWait = Math.min(WATCH_LONGEST_WAIT_MS, watchWait * 2);
              again(watchWait);
            }
          }
        })
        .catch(function () {
          failures += 1;  /* the server or the network is away: back off, up to a minute */
          again(Math.min(60000, interval * Math.pow(2, failures)));
        });
    }
    tick();
  }

  function start() {
    var widgets = document.querySelectorAll(".safetynet-progress:not([data-polling])");
    for (var i = 0; i < widgets.length; i++) {
      widgets[i].setAttribute("data-polling", "1");
      poll(widgets[i]);
    }
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
