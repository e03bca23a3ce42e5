"""Classification and regression metrics in pure jnp, agreeing with scikit-learn."""
