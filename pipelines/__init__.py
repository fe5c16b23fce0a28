"""diffusers integration of cascade-vsr, installed as `cascade_vsr.pipelines`: the pipeline stage and the
upstream latent-format adapters."""
