"""Figures of runs: training curves over seeds, learned levels over recorded histograms, results
against the published numbers. Matplotlib only, drawn off-screen (the Agg backend)."""
