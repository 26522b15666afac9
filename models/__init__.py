"""The model factory: GLM reference model, checkpoint loading, export to bundles (needs the `factory` extra)."""
