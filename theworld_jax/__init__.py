"""theworld-jax: TheWorld (Gemma 3 + the Cosmos-Predict2 VAE world branch) in JAX / Flax NNX."""

__all__ = ["CosmosVAE", "TheWorld"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so that `import theworld_jax.config` stays light.
    if name == "TheWorld":
        from theworld_jax.theworld import TheWorld

        return TheWorld
    if name == "CosmosVAE":
        from theworld_jax.cosmos_vae import CosmosVAE

        return CosmosVAE
    raise AttributeError(f"module 'theworld_jax' has no attribute {name!r}")
