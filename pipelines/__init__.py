"""diffusers integration of cascade-vsr: the pipeline stage and the upstream latent-format adapters."""
