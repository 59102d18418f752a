"""The report layer: reads results.json only (analysis, diagnosis, report, plots, compare, the
recommended/ bundle). Above the stages; never imported by them."""
