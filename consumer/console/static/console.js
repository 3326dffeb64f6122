// Leveret console: times in the viewer's zone. The server writes UTC ISO 8601 in
// <time datetime>; this shows it as local time (and "in 3 min" / "12 s ago" where asked).
(function () {
  "use strict";
  function rel(ms) {
    var s = Math.round(Math.abs(ms) / 1000), t;
    if (s < 60) t = s + " s"; else if (s < 3600) t = Math.round(s / 60) + " min";
    else if (s < 86400) t = Math.round(s / 3600) + " h"; else t = Math.round(s / 86400) + " d";
    return ms > 0 ? "in " + t : t + " ago";
  }
  function localise(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) return;
      var diff = d.getTime() - Date.now();
      el.title = d.toISOString() + " (UTC)";
      if (el.hasAttribute("data-ago")) { el.textContent = d.toLocaleTimeString(); return; }
      el.textContent = d.toLocaleString() + (el.hasAttribute("data-rel") ? " (" + rel(diff) + ")" : "");
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
  document.addEventListener("htmx:load", function (e) { localise(e.target); });
})();
