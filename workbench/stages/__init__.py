"""The pipeline's stages, one module each, in the order a run calls them: compress -> export -> bench."""
