// The dashboard's chart: Chart.js draws the series the server renders into #chart-data,
// and redraws it whenever htmx refreshes the live part of the page.
"use strict";

(() => {
  const COLORS = {
    received: "#64748b",
    delivered: "#16a34a",
    deferred: "#d97706",
    bounced: "#dc2626",
    opened: "#4f46e5",
    clicked: "#0891b2",
  };
  let chart = null;

  function read() {
    const node = document.getElementById("chart-data");
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch {
      return null;
    }
  }

  function datasets(data) {
    return data.lines.map((line) => ({
      label: line.label,
      data: line.data,
      borderColor: COLORS[line.key] || "#888",
      backgroundColor: (COLORS[line.key] || "#888") + "22",
      borderWidth: 2,
      pointRadius: 0,
      pointHoverRadius: 4,
      tension: 0.25,
      fill: line.key === "received",
    }));
  }

  function draw() {
    const data = read();
    const canvas = document.querySelector("#chart-card canvas");
    if (!data || !canvas || typeof Chart === "undefined") return;
    if (chart) {
      chart.data.labels = data.labels;
      const fresh = datasets(data);
      chart.data.datasets.forEach((set, i) => { set.data = fresh[i].data; });
      chart.update("none");
      return;
    }
    chart = new Chart(canvas, {
      type: "line",
      data: { labels: data.labels, datasets: datasets(data) },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom", labels: { usePointStyle: true, boxWidth: 8, padding: 16 } },
        },
        scales: {
          x: { grid: { display: false }, ticks: { maxTicksLimit: 10, maxRotation: 0 } },
          y: { beginAtZero: true, ticks: { precision: 0 }, grid: { color: "#eef0f5" } },
        },
      },
    });
    document.body.dataset.chart = "drawn";
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:after:settle", draw);
})();
