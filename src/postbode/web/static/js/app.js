// Small comforts for every page; each page works without them.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // The app and organization switchers go as soon as something is picked.
  for (const select of document.querySelectorAll("select.autosubmit")) {
    select.addEventListener("change", () => select.form.requestSubmit());
  }

  // "Select all" in the queue table.
  for (const all of document.querySelectorAll("input.select-all")) {
    all.addEventListener("change", () => {
      const table = all.closest("table");
      for (const box of table.querySelectorAll("tbody input[type=checkbox][name=ids]")) {
        box.checked = all.checked;
      }
    });
  }

  // Buttons that change something for good ask first (e.g. cancelling one delivery).
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  }

  // Copy buttons next to secrets shown once.
  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source || !navigator.clipboard) return;
      await navigator.clipboard.writeText(source.textContent.trim());
      button.textContent = "Copied";
    });
  }
});
