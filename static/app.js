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
})();
