"""One module per method (refl, d3po, itercomp, zo_ranksgd, ...)."""
