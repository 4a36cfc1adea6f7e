// Small enhancements; every page works without them.
(function () {
  "use strict";
  var DEFAULT_PORTS = { ssl: "993", starttls: "143", none: "143" };
  // Encryption changes the usual port, unless the admin typed their own.
  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t.name !== "encryption") return;
    var port = document.getElementById("port");
    if (!port) return;
    var known = Object.values(DEFAULT_PORTS);
    if (port.value === "" || known.indexOf(port.value) !== -1) port.value = DEFAULT_PORTS[t.value] || port.value;
  });

  // API Name follows the Name until the admin edits it (same rule as
  // forms.connection.suggest_api_name on the server).
  function suggestApiName(name) {
    var s = name.replace(/[^A-Za-z0-9]+/g, "_").replace(/^_+|_+$/g, "");
    if (s && !/^[A-Za-z]/.test(s)) s = "C_" + s;
    return s.slice(0, 80);
  }
  document.addEventListener("input", function (e) {
    var t = e.target, form = document.getElementById("connection-form");
    if (t.id !== "name" || !form || !form.dataset.adding) return;
    var api = document.getElementById("api_name");
    var prev = t.dataset.prev !== undefined ? t.dataset.prev : t.defaultValue;
    if (api && (api.value === "" || api.value === suggestApiName(prev))) api.value = suggestApiName(t.value);
    t.dataset.prev = t.value;
  });
})();
