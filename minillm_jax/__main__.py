"""`python -m minillm_jax COMMAND [flags]`: the `minillm` console script without installing it (minillm_jax/main.py)."""
from minillm_jax.main import main

main()
