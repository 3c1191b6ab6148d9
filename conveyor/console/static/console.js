// conveyor console: live updates through one EventSource per page. The server says what changed
// (debounced); the page re-reads the part it shows from the console, which answers from its
// shared overview or one cheap query. Written for this console; no framework, no build step.
"use strict";

(function () {
  const state = document.getElementById("live-state");
  const live = document.getElementById("live");

  function show(text, name) {
    if (state) {
      state.textContent = text;
      state.dataset.state = name;
    }
  }

  if (!window.EventSource) {
    show("no live updates", "off");
    return;
  }

  let loading = false;
  let again = false;

  async function reload() {
    if (!live || !live.dataset.refreshOn) return;
    if (loading) {
      again = true; // one more read after this one: never miss the last change
      return;
    }
    loading = true;
    try {
      const response = await fetch(live.dataset.fragment, {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.ok) {
        live.innerHTML = await response.text(); // rendered and escaped by the server
        live.dataset.version = String(Number(live.dataset.version || "0") + 1);
      }
    } catch (error) {
      // the console is away; the stream's reconnect brings a re-read
    } finally {
      loading = false;
      if (again) {
        again = false;
        reload();
      }
    }
  }

  const source = new EventSource(document.body.dataset.events);

  // Every (re)connected stream starts with "hello". Changes between the page's rendering (or a
  // lost stream) and now were not heard: re-read once.
  source.addEventListener("hello", function (event) {
    const data = JSON.parse(event.data);
    show(data.listening ? "live" : "live (database away)", data.listening ? "open" : "degraded");
    reload();
  });
  source.addEventListener("listener", function (event) {
    const data = JSON.parse(event.data);
    show(data.listening ? "live" : "live (database away)", data.listening ? "open" : "degraded");
    if (data.listening) reload();
  });
  source.addEventListener("error", function () {
    show("reconnecting…", "reconnecting");
  });

  if (!live) return;

  // The run itself, or one of the children it lists: their statuses are on the page.
  function shownOnRunPage(id) {
    if (id === live.dataset.runId) return true;
    return Array.prototype.some.call(live.querySelectorAll("[data-child]"), function (row) {
      return row.dataset.child === id;
    });
  }

  const refreshOn = live.dataset.refreshOn;
  if (refreshOn === "overview") {
    source.addEventListener("overview", function (event) {
      if (!JSON.parse(event.data).error) reload();
    });
  } else if (refreshOn === "runs" || refreshOn === "run") {
    source.addEventListener("runs", function (event) {
      const data = JSON.parse(event.data);
      if (refreshOn === "run" && !data.all && !(data.ids || []).some(shownOnRunPage)) {
        return;
      }
      reload();
    });
  }
})();
