"""artifact x backend x shape -> measurements: backends, rounds and repeats, workers, generation,
profiles, roofline, executors."""
