// Live updates without a framework or a build: the server renders every fragment; this
// only swaps them in when the status stream says something changed.
(function () {
  "use strict";

  // One fetch per region at a time: changes that come while one runs (a pass over 60
  // apps, versions read from git) are folded into a single fetch after it.
  const again = new Map();

  async function refresh(region) {
    if (again.has(region)) {
      again.set(region, true);
      return;
    }
    again.set(region, false);
    try {
      const response = await fetch(region.dataset.src, { headers: { Accept: "text/html" } });
      if (response.ok) region.innerHTML = await response.text();
    } finally {
      const wanted = again.get(region);
      again.delete(region);
      if (wanted) refresh(region);
    }
  }

  function connect() {
    const source = new EventSource("/stream");
    source.addEventListener("status", function (event) {
      const change = JSON.parse(event.data);
      // A change comes as the cells of each view (the matrix's, the pipeline's row); a
      // page shows one view, so it redraws only when it found none of them (a new row).
      const cells = Object.entries(change.html || {});
      let replaced = 0;
      for (const [id, html] of cells) {
        const element = document.getElementById(id);
        if (element) {
          element.outerHTML = html;
          replaced += 1;
        }
      }
      const missing = Boolean(change.refresh) || (cells.length > 0 && replaced === 0);
      document.querySelectorAll("[data-live]").forEach(function (region) {
        const keys = (region.dataset.keys || "").split(" ");
        const wanted = keys.includes("*") || keys.includes(change.name);
        const envs = (region.dataset.envs || "").split(",").filter(Boolean);
        const shown =
          !envs.length || Boolean(change.cluster) || envs.includes(change.name.split(".")[0]);
        if (wanted || (missing && shown && region.dataset.live === "onmiss")) refresh(region);
      });
    });
    source.addEventListener("reload", function () {
      source.close();
      window.location.reload();
    });
    // A change between the server rendering this page and the stream opening (or while
    // it was reconnecting) is not replayed: fetch every live region once it is open.
    source.addEventListener("open", async function () {
      const regions = document.querySelectorAll("[data-live]");
      await Promise.all(Array.from(regions, refresh));
      document.documentElement.dataset.stream = "connected";
    });
  }

  document.addEventListener("submit", function (event) {
    const button = event.submitter;
    const question = (button && button.dataset.confirm) || event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
  document.querySelectorAll("[data-lazy]").forEach(refresh);
  if (window.EventSource) connect();
})();
