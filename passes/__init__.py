"""FX graph passes of dualpipe_fx: pure functions from graph to graph; no ranks, no processes."""
