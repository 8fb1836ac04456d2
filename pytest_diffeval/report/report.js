// The page writes what it rendered into attributes of <html>, so a headless browser's
// --dump-dom shows it (tests/test_report.py): images decoded with their natural sizes,
// the tests the filter leaves visible, the visible text of each grid's labels and the
// failing metrics shown.  "#failed-only" in the URL turns the filter on.
(function () {
  var root = document.documentElement, box = document.getElementById('failed-only');
  function shown(element) { return element.getClientRects().length > 0; }
  function text(element) { return element ? element.innerText.trim() : null; }
  function visible() {
    var out = [], failing = [], labels = [];
    document.querySelectorAll('section.test').forEach(function (s) {
      if (!shown(s)) return;
      var test = s.getAttribute('data-test');
      out.push(test);
      s.querySelectorAll('.check.bad[data-metric]').forEach(function (c) {
        if (shown(c)) failing.push([test, text(c.querySelector('.metric'))]);
      });
      s.querySelectorAll('.prompt-row').forEach(function (r) {
        labels.push([test, text(r.querySelector('.prompt-label')),
                     Array.prototype.map.call(r.querySelectorAll('figure'), function (f) {
                       return [text(f.querySelector('figcaption b')), f.querySelectorAll('img.baseline').length];
                     })]);
      });
    });
    root.setAttribute('data-visible-tests', JSON.stringify(out));
    root.setAttribute('data-failing-metrics', JSON.stringify(failing));
    root.setAttribute('data-grid-labels', JSON.stringify(labels));
  }
  function apply() {
    document.body.classList.toggle('failed-only', box.checked);
    root.setAttribute('data-filter', box.checked ? 'failed-only' : 'all');
    visible();
  }
  box.addEventListener('change', function () {
    history.replaceState(null, '', box.checked ? '#failed-only' : '#');
    apply();
  });
  if (location.hash === '#failed-only') box.checked = true;
  apply();
  function measure() {
    var images = Array.prototype.slice.call(document.images);
    var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
    root.setAttribute('data-images-total', images.length);
    root.setAttribute('data-images-rendered', ok.length);
    root.setAttribute('data-baseline-images-rendered', ok.filter(function (i) {
      return i.classList.contains('baseline'); }).length);
    root.setAttribute('data-images-min-natural', ok.length ? Math.min.apply(null, ok.map(function (i) {
      return Math.min(i.naturalWidth, i.naturalHeight); })) : 0);
    root.setAttribute('data-render-check', 'done');
  }
  Promise.all(Array.prototype.map.call(document.images, function (i) {
    return i.decode ? i.decode().catch(function () {}) : null;
  })).then(measure);
  window.addEventListener('load', measure);
})();
