"""Floor 2, the models: the latent upsampler, the conditional DiT and its attention modes, and the lossless
space-to-depth autoencoder. Import only the core."""
