// report.html: inlined by tracer/exporters/html.py. Hand-written, no libraries, no network.
// Draws from the JSON island (#report-data): each waterfall's time axis, its GPU utilization line and
// the side of each bar its label goes on; zooms and pans by changing two CSS variables per waterfall.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var MIN_VIEW_MS = 0.01;

  function niceStep(spanMs) {
    var raw = spanMs / 8, power = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / power;
    return power * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
  }

  function Waterfall(element, interval) {
    this.element = element;
    this.interval = interval;
    this.plot = element.querySelector(".plot");
    this.axis = element.querySelector(".axis");
    this.grid = element.querySelector(".grid");
    this.svg = element.querySelector(".gpu svg");
    this.fullStart = interval.view[0];
    this.fullSpan = Math.max(MIN_VIEW_MS, interval.view[1] - interval.view[0]);
    this.reset();
    this.drawGpu();
    this.listen();
  }

  Waterfall.prototype.reset = function () { this.show(this.fullStart, this.fullSpan); };

  Waterfall.prototype.show = function (start, span) {
    span = Math.min(this.fullSpan, Math.max(MIN_VIEW_MS, span));
    start = Math.min(this.fullStart + this.fullSpan - span, Math.max(this.fullStart, start));
    this.start = start;
    this.span = span;
    this.element.style.setProperty("--view-start", String(start));
    this.element.style.setProperty("--view-ms", String(span));
    this.drawAxis();
    this.placeLabels();
    if (this.svg) { this.svg.setAttribute("viewBox", start + " 0 " + span + " 100"); }
  };

  Waterfall.prototype.zoom = function (factor, centreMs) {
    if (centreMs === undefined) { centreMs = this.start + this.span / 2; }
    var span = Math.min(this.fullSpan, Math.max(MIN_VIEW_MS, this.span * factor));
    this.show(centreMs - (centreMs - this.start) * span / this.span, span);
  };

  Waterfall.prototype.drawAxis = function () {
    var step = niceStep(this.span), digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
    var ticks = [], lines = [];
    for (var t = Math.ceil(this.start / step) * step; t <= this.start + this.span + step / 1000; t += step) {
      var fraction = (t - this.start) / this.span, left = (fraction * 100) + "%";
      lines.push('<span class="gridline" style="left:' + left + '"></span>');
      if (fraction < 0.96) {  // a label right of the last tick would be cut off
        ticks.push('<span class="tick" style="left:' + left + '">' + t.toFixed(digits) + " ms</span>");
      }
    }
    this.axis.innerHTML = ticks.join("");
    this.grid.innerHTML = lines.join("");
  };

  // A label goes inside a bar wide on screen (from its visible start), right of a narrow one, or
  // left of a narrow one that ends near the right edge.
  Waterfall.prototype.placeLabels = function () {
    var phases = this.interval.phases, self = this;
    this.element.querySelectorAll(".bar[data-i]").forEach(function (bar) {
      var phase = phases[Number(bar.getAttribute("data-i"))];
      var from = (phase.t0 - self.start) / self.span, to = (phase.t1 - self.start) / self.span;
      var shownFrom = Math.max(from, 0), shownTo = Math.min(to, 1);
      var inside = shownTo - shownFrom > 0.3, left = !inside && shownTo > 0.7;
      bar.classList.toggle("label-in", inside);
      bar.classList.toggle("label-left", left);
      bar.style.setProperty("--label-at", inside ? ((shownFrom - from) / (to - from) * 100) + "%" : "0%");
    });
  };

  Waterfall.prototype.drawGpu = function () {
    if (!this.svg) { return; }
    var series = this.interval.gpu_util || {};
    this.svg.querySelectorAll("polyline").forEach(function (line) {
      var samples = series[line.getAttribute("data-gpu")] || [];
      line.setAttribute("points", samples.map(function (s) { return s[0] + "," + (100 - s[1]); }).join(" "));
    });
  };

  Waterfall.prototype.listen = function () {
    var self = this, drag = null;
    this.element.addEventListener("wheel", function (event) {
      event.preventDefault();
      var rect = self.plot.getBoundingClientRect();
      var centre = self.start + (event.clientX - rect.left) / rect.width * self.span;
      self.zoom(event.deltaY < 0 ? 1 / 1.25 : 1.25, centre);
    }, { passive: false });
    this.element.addEventListener("mousedown", function (event) {
      drag = { x: event.clientX, start: self.start, width: self.plot.getBoundingClientRect().width };
      self.element.classList.add("dragging");
    });
    window.addEventListener("mousemove", function (event) {
      if (drag) { self.show(drag.start - (event.clientX - drag.x) / drag.width * self.span, self.span); }
    });
    window.addEventListener("mouseup", function () {
      drag = null;
      self.element.classList.remove("dragging");
    });
  };

  var waterfalls = {};
  data.intervals.forEach(function (interval) {
    var element = document.querySelector('.waterfall[data-interval="' + interval.index + '"]');
    if (element) { waterfalls[interval.index] = new Waterfall(element, interval); }
  });
  document.querySelectorAll(".zoom button").forEach(function (button) {
    button.addEventListener("click", function () {
      var waterfall = waterfalls[button.getAttribute("data-for")], action = button.getAttribute("data-zoom");
      if (!waterfall) { return; }
      if (action === "in") { waterfall.zoom(1 / 1.5); } else if (action === "out") { waterfall.zoom(1.5); } else { waterfall.reset(); }
    });
  });
}());
