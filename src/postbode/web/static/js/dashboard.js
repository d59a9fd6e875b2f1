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

  // Peaks and dips raised for a bucket: a marker above it, on its own dataset.
  function markers(data) {
    const top = Math.max(1, ...data.lines.map((l) => Math.max(0, ...l.data)));
    const points = data.labels.map(() => null);
    for (const mark of data.marks || []) points[mark.index] = top;
    return {
      label: "peaks and dips",
      data: points,
      showLine: false,
      pointStyle: "triangle",
      pointRadius: 7,
      pointHoverRadius: 9,
      borderColor: "#b42318",
      backgroundColor: "#f04438",
    };
  }

  // A click on a bucket opens the message log of that bucket's time.
  function open(data, index) {
    if (index == null || !data.starts || !data.starts[index]) return;
    const target = new URL(data.log_url || "/messages", window.location.origin);
    target.searchParams.set("since", data.starts[index]);
    target.searchParams.set("until", data.ends[index]);
    window.location.assign(target.pathname + target.search);
  }

  function datasets(data) {
    return [...data.lines.map((line) => ({
      label: line.label,
      data: line.data,
      borderColor: COLORS[line.key] || "#888",
      backgroundColor: (COLORS[line.key] || "#888") + "22",
      borderWidth: 2,
      pointRadius: 0,
      pointHoverRadius: 4,
      tension: 0.25,
      fill: line.key === "received",
    })), markers(data)];
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
        onClick: (_event, elements) => open(read() || data, elements.length ? elements[0].index : null),
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
