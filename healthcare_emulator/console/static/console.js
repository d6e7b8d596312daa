// The console's only script: BigQuery's table naming rules, checked as the person types.
// The server checks the same rules again (console/names.py); this only says so sooner.
"use strict";
(function () {
  var allowed = /^[\p{L}\p{M}\p{N}\p{Pc}\p{Pd}\p{Zs}]+$/u;
  function problem(name) {
    if (!name) return "Enter a table name.";
    if (new TextEncoder().encode(name).length > 1024) return "A table name can be at most 1,024 UTF-8 bytes.";
    if (!allowed.test(name)) {
      var bad = Array.from(name).find(function (c) { return !allowed.test(c); });
      return "'" + bad + "' is not allowed: a table name can contain letters, marks, numbers, connectors " +
             "such as _, dashes and spaces.";
    }
    if (name !== name.trim()) return "A table name cannot start or end with a space.";
    return "";
  }
  function check(input) {
    var msg = input.value === "" ? "" : problem(input.value);
    var out = document.getElementById(input.getAttribute("aria-describedby"));
    if (out) out.textContent = msg;
    input.setCustomValidity(problem(input.value));
    input.classList.toggle("invalid", msg !== "");
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("input[data-validate=bq-table]").forEach(function (input) {
      input.addEventListener("input", function () { check(input); });
      if (input.value) check(input);
    });
  });
})();
