// MathJax settings for pymdownx.arithmatex (generic mode): \( \) inline, \[ \] display.
// MathJax itself is served with the site, in javascripts/mathjax/: es5/tex-chtml.js and
// es5/output/chtml/fonts/woff-v2/ of the npm package mathjax@3.2.2 (Apache-2.0, LICENSE there),
// at the same relative paths, which tex-chtml.js loads its fonts from. To refresh it:
// `npm pack mathjax@3.2.2` and copy those two paths and LICENSE out of the tarball.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  startup: {
    ready() {
      MathJax.startup.defaultReady();
      // Material's document$ emits each page (the first, and any that instant navigation swaps
      // in): typeset it once the typesetting under way is done. No output.clearCache(): it drops
      // the CSS of the glyphs already typeset, and the formulas come out blank.
      document$.subscribe(() => {
        MathJax.startup.promise = MathJax.startup.promise.then(() => {
          MathJax.typesetClear();
          MathJax.texReset();
          return MathJax.typesetPromise();
        });
      });
    },
  },
};
