"""theworld-jax: TheWorld (Gemma 3 + the Cosmos-Predict2 VAE world branch) in JAX / Flax NNX."""

from theworld_jax.modeling.cosmos_vae import CosmosVAE
from theworld_jax.theworld import TheWorld

__all__ = ["CosmosVAE", "TheWorld"]
__version__ = "0.1.0"
